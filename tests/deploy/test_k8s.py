"""deploy/k8s, checked offline: Kubernetes' own schemas (kubernetes-validate) for the core kinds,
a JSON schema written from KEDA's ScaledObject CRD for the autoscaler, and the manifests held
against each other and against the code (settings, ports, probes, grace period, metric names).
"""

from __future__ import annotations

import json
import re
import shutil
from functools import cache
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shared.celery_app import QUEUE
from shared.settings import Settings
from tests.support.deploy_files import (
    exec_form,
    final_stage,
)
from tests.support.packaging import (
    check_entry_points,
)
from tests.support.paths import REPO as REPO_ROOT
from tests.support.paths import SUPPORT
from tests.support.promql_check import check_promql, unknown_metrics
from tests.support.stack import require_tool

REPO = REPO_ROOT
K8S = REPO / "deploy" / "k8s"
KEDA_SCHEMA = SUPPORT / "schemas" / "keda-scaledobject-v1alpha1.json"
K8S_VERSION = "1.30.0"
CORE_GROUPS = ("v1", "apps/v1", "policy/v1", "autoscaling/v2")
OUR_IMAGES = {"model-dispatcher-api", "model-dispatcher-worker", "model-dispatcher-torchserve"}
# Image -> the compose service built from the same Dockerfile (tests/support/deploy_files.py).
DISPATCHER_IMAGES = {"model-dispatcher-api": "api", "model-dispatcher-worker": "worker"}


@cache
def kustomization() -> dict[str, Any]:
    data = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert data["kind"] == "Kustomization"
    return data


@cache
def resources() -> list[dict[str, Any]]:
    docs = []
    for name in kustomization()["resources"]:
        path = K8S / name
        assert path.is_file(), f"kustomization.yaml lists {name}, which does not exist"
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    listed = set(kustomization()["resources"])
    unlisted = {p.name for p in K8S.glob("*.yaml")} - listed - {"kustomization.yaml"}
    assert not unlisted, f"not in kustomization.yaml: {unlisted}"
    return docs


def resource(kind: str, name: str) -> dict[str, Any]:
    found = [r for r in resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}"
    return found[0]


def pod_spec(kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = resource(kind, name)["spec"]["template"]["spec"]
    return spec


def container(kind: str, name: str) -> dict[str, Any]:
    (only,) = pod_spec(kind, name)["containers"]
    return only


def workloads() -> list[dict[str, Any]]:
    return [r for r in resources() if r["kind"] in ("Deployment", "StatefulSet")]


@cache
def settings() -> Settings:
    data = resource("ConfigMap", "dispatcher-settings")["data"]
    unknown = {key for key in data if key.lower() not in Settings.model_fields}
    assert not unknown, f"not Settings fields: {unknown}"
    return Settings(_env_file=None, **{key.lower(): value for key, value in data.items()})


def test_core_kinds_validate_against_the_kubernetes_schemas() -> None:
    checked = 0
    for doc in resources():
        if doc["apiVersion"] in CORE_GROUPS:
            # strict: unknown fields (typos like `livenessProbes`) are errors too.
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            checked += 1
    kinds = {doc["kind"] for doc in resources()}
    assert {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget", "ConfigMap"} <= kinds
    assert checked == len([d for d in resources() if d["apiVersion"] != "keda.sh/v1alpha1"])


def test_keda_scaled_object_matches_the_crd() -> None:
    schema = json.loads(KEDA_SCHEMA.read_text())
    scaled = resource("ScaledObject", "worker")
    jsonschema.validate(scaled, schema)
    # The HPA behavior it passes through is autoscaling/v2's: validate it as such.
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "check"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "worker"},
            "maxReplicas": scaled["spec"]["maxReplicaCount"],
            "behavior": behavior,
        },
    }
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
    # And the schema has teeth: a misspelt field is refused.
    broken = json.loads(json.dumps(scaled))
    broken["spec"]["minReplicas"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_workers_scale_on_queued_plus_in_flight() -> None:
    scaled = resource("ScaledObject", "worker")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", "worker")
    resource("Deployment", "worker")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    # LLEN alone misses what workers prefetched: the backlog is both gauges.
    assert "dispatcher_queue_depth" in query
    assert "dispatcher_tasks_in_flight" in query
    assert f'queue="{QUEUE}"' in query
    env = {item["name"]: item["value"] for item in container("Deployment", "worker")["env"]}
    slots = env["WORKER_MAX_CALLS_PER_BACKEND"]  # the calls one replica runs at once
    assert trigger["metadata"]["threshold"] == slots, "one worker's worth of tasks each"
    assert scaled["spec"]["minReplicaCount"] >= 1, "the API's /ready needs a live worker"
    assert not unknown_metrics([query])


def test_the_autoscaling_query_is_valid_promql() -> None:
    promtool = shutil.which("promtool")
    require_tool(promtool is not None, "no `promtool`: apt-get install prometheus (bootstrap.sh)")
    assert promtool is not None
    (trigger,) = resource("ScaledObject", "worker")["spec"]["triggers"]
    check_promql([trigger["metadata"]["query"]], promtool)
    # And the check has teeth: a broken expression is refused.
    with pytest.raises(AssertionError):
        check_promql([trigger["metadata"]["query"] + ")"], promtool)


def test_every_dispatcher_pod_starts_a_module_of_its_image() -> None:
    """What each of our containers runs (args, else the image's CMD) names a module that the
    image holds: a renamed module breaks this, not a rollout."""
    started = {}
    for workload in workloads():
        for item in workload["spec"]["template"]["spec"]["containers"]:
            if item["image"] not in DISPATCHER_IMAGES:
                continue
            argv = [*item.get("command", []), *item.get("args", [])]
            if not argv:
                service = DISPATCHER_IMAGES[item["image"]]
                argv = exec_form(final_stage(service).args("CMD")[-1], "CMD")
            where = f"{workload['kind']}/{workload['metadata']['name']}"
            started[where] = check_entry_points(argv, where)
    assert started == {
        "Deployment/api": ["api.main:create_app"],
        "Deployment/worker": ["worker.app:app"],
        "Deployment/worker-interactive": ["worker.app:app"],
    }


def test_worker_grace_period_outlasts_the_longest_task() -> None:
    spec = pod_spec("Deployment", "worker")
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > settings().task_time_limit, (grace, settings().task_time_limit)
    args = container("Deployment", "worker")["args"]
    assert args[:2] == ["celery", "-A"]
    assert QUEUE in args[args.index("-Q") + 1].split(",")
    assert args[args.index("--pool") + 1] == "threads"


def test_api_probes_health_and_ready() -> None:
    api = container("Deployment", "api")
    port = next(p for p in api["ports"] if p["name"] == "http")["containerPort"]
    assert api["args"][api["args"].index("--port") + 1] == str(port)
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"
    ready = " ".join(api["readinessProbe"]["exec"]["command"])
    assert f"http://127.0.0.1:{port}/ready" in ready
    # /ready needs a key when keys are set: the probe sends one from the environment, not the spec.
    assert "DISPATCHER_API_KEYS" in ready
    assert "X-API-Key" in ready
    # Sync requests may block DISPATCH_MAX_WAIT: a rollout lets them finish.
    assert pod_spec("Deployment", "api")["terminationGracePeriodSeconds"] > (
        Settings(_env_file=None).dispatch_max_wait
    )


def test_services_and_budgets_select_real_pods() -> None:
    labels = {
        (w["kind"], w["metadata"]["name"]): w["spec"]["template"]["metadata"]["labels"]
        for w in workloads()
    }
    for workload in workloads():
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels[(workload["kind"], workload["metadata"]["name"])].items()
    for doc in resources():
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
        elif doc["kind"] == "PodDisruptionBudget":
            selector = doc["spec"]["selector"]["matchLabels"]
        else:
            continue
        matched = [key for key, pod in labels.items() if selector.items() <= pod.items()]
        assert matched, f"{doc['kind']}/{doc['metadata']['name']} selects no pods"
        if doc["kind"] == "Service":
            ports = {
                p["name"]
                for kind, name in matched
                for c in pod_spec(kind, name)["containers"]
                for p in c.get("ports", [])
            }
            for port in doc["spec"]["ports"]:
                assert port["targetPort"] in ports, f"{doc['metadata']['name']}: {port}"
    budgets = {d["metadata"]["name"] for d in resources() if d["kind"] == "PodDisruptionBudget"}
    assert {"api", "worker", "torchserve"} <= budgets


def test_settings_point_at_the_services() -> None:
    config = settings()
    redis_host = re.match(r"rediss?://(?:[^@/]*@)?([^:/]+)", config.redis_url)
    assert redis_host
    assert redis_host.group(1) == "redis"
    resource("Service", "redis")
    torchserve = resource("Service", "torchserve")
    assert config.torchserve_url == f"http://torchserve:{torchserve['spec']['ports'][0]['port']}"
    for name in ("api", "worker", "worker-interactive"):
        env_from = container("Deployment", name)["envFrom"]
        assert {"configMapRef": {"name": "dispatcher-settings"}} in env_from
        secrets = [ref["secretRef"] for ref in env_from if "secretRef" in ref]
        assert secrets == [{"name": "dispatcher-secrets", "optional": True}]
        # The last source wins: the Secret's BACKENDS (with tokens) replaces the ConfigMap's.
        assert "secretRef" in env_from[-1], f"{name}: the Secret must come after the ConfigMap"
    assert not [d for d in resources() if d["kind"] == "Secret"], "no secrets in the repository"
    data = resource("ConfigMap", "dispatcher-settings")["data"]
    assert "token" not in data["BACKENDS"], "a backend's token belongs in dispatcher-secrets"


def test_prometheus_scrape_annotations_name_real_ports() -> None:
    expected = {"api": 8000, "worker": settings().worker_metrics_port, "torchserve": 8082}
    for name, port in expected.items():
        template = resource("Deployment", name)["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        assert int(annotations["prometheus.io/port"]) == port
        ports = [p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]]
        assert port in ports, f"{name} does not expose {port}"


def test_redis_keeps_an_append_only_file_on_a_volume() -> None:
    redis = resource("StatefulSet", "redis")
    args = container("StatefulSet", "redis")["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    data_dir = args[args.index("--dir") + 1]
    mounts = {m["name"]: m["mountPath"] for m in container("StatefulSet", "redis")["volumeMounts"]}
    claims = {claim["metadata"]["name"] for claim in redis["spec"]["volumeClaimTemplates"]}
    assert any(mounts.get(claim) == data_dir for claim in claims)


def test_pods_run_as_non_root_from_our_images() -> None:
    images = {entry["name"] for entry in kustomization()["images"]}
    assert images == OUR_IMAGES
    for workload in workloads():
        spec = workload["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, workload["metadata"]["name"]
        for item in spec["containers"]:
            assert item["securityContext"]["allowPrivilegeEscalation"] is False
            assert item["image"] in OUR_IMAGES or item["image"].startswith("redis:")
