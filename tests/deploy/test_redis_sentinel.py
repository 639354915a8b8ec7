"""Redis with Sentinel as deployed: deploy/k8s/redis-sentinel (a kustomize component of the base)
and docker compose's `sentinel` profile, checked offline. The base with the component is
rendered by kustomize itself (`kubectl kustomize`, client side) and validated against
Kubernetes' schemas; the topology (3 data nodes, 3 sentinels, anti-affinity, budgets that keep
a quorum), the settings the scripts get, the passwords (from a Secret, never inline), and the
dispatcher's settings as its pods see them, parsed by the dispatcher's own parser. That the
scripts pick the right roles is tests/deploy/test_redis_sentinel_scripts.py, on real servers.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from shared.redis_url import parse_sentinel_url
from shared.settings import Settings
from tests.deploy.sentinel_manifests import (
    AUTH_SECRET,
    BASE,
    NODE_SCRIPT,
    SENTINEL_SCRIPT,
    find,
    kubectl,
    pod_env,
    render,
)
from tests.deploy.sentinel_manifests import init_env as component_init_env
from tests.support.deploy_files import (
    COMPOSE_FILE,
    REPO,
    compose_cli,
    environment,
    service,
    services,
)
from tests.support.stack import require_tool

K8S_VERSION = "1.30.0"
CORE_GROUPS = ("v1", "apps/v1", "policy/v1", "autoscaling/v2")
DISPATCHER_PODS = {"api": "api", "worker": "worker", "worker-interactive": "worker"}
STAND_IN = {AUTH_SECRET: {"password": "0a1b2c", "sentinel-password": "3d4e5f"}}
DEFAULT_SERVICES = {"redis", "torchserve", "api", "worker", "worker-interactive", "webhooks"}
HA_NODES = ("redis-1", "redis-2", "redis-3")
HA_SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
HA_DISPATCHERS = ("api-sentinel", "worker-sentinel", "webhooks-sentinel")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    require_tool(kubectl() is not None, "no `kubectl` (kustomize): scripts/bootstrap.sh")
    return render(tmp_path_factory.mktemp("overlay"))


def pod(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(docs, kind, name)["spec"]["template"]["spec"]
    return spec


def init_env(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    (init,) = pod(docs, "StatefulSet", name)["initContainers"]
    return pod_env(init, {}, STAND_IN, pod_name=f"{name}-1")


def addresses(statefulset: dict[str, Any], service_doc: dict[str, Any]) -> list[str]:
    """Every pod's stable name under the headless Service, with the Service's port."""
    (port,) = service_doc["spec"]["ports"]
    name, count = statefulset["metadata"]["name"], statefulset["spec"]["replicas"]
    return [f"{name}-{n}.{service_doc['metadata']['name']}:{port['port']}" for n in range(count)]


# === Kubernetes ================================================================================


def test_the_base_with_the_component_validates(rendered: list[dict[str, Any]]) -> None:
    for doc in rendered:
        if doc["apiVersion"] in CORE_GROUPS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "model-dispatcher", doc["metadata"]["name"]
    kinds_names = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    assert ("StatefulSet", "redis") not in kinds_names, "the single Redis must go"
    assert ("Service", "redis") not in kinds_names
    assert not [d for d in rendered if d["kind"] == "Secret"], "no secrets in the repository"
    # The base's own workloads are all still there.
    for kind, name in (("Deployment", "api"), ("Deployment", "worker"), ("ScaledObject", "worker")):
        assert (kind, name) in kinds_names


def test_three_data_nodes_and_three_sentinels_one_per_machine(
    rendered: list[dict[str, Any]],
) -> None:
    for name, port_name in (("redis-node", "redis"), ("redis-sentinel", "sentinel")):
        statefulset = find(rendered, "StatefulSet", name)
        assert statefulset["spec"]["replicas"] == 3
        headless = find(rendered, "Service", statefulset["spec"]["serviceName"])
        assert headless["spec"]["clusterIP"] == "None", (
            "stable per-pod names need a headless Service"
        )
        assert headless["spec"]["publishNotReadyAddresses"] is True
        labels = statefulset["spec"]["template"]["metadata"]["labels"]
        assert headless["spec"]["selector"].items() <= labels.items()
        (port,) = headless["spec"]["ports"]
        (container,) = pod(rendered, "StatefulSet", name)["containers"]
        assert {"name": port_name, "containerPort": port["port"]} in container["ports"]
        assert port["targetPort"] == port_name
        (term,) = pod(rendered, "StatefulSet", name)["affinity"]["podAntiAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"].items() <= labels.items()
        budget = find(rendered, "PodDisruptionBudget", name)
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert budget["spec"]["maxUnavailable"] == 1
    quorum = int(init_env(rendered, "redis-sentinel")["QUORUM"])
    assert quorum == 3 // 2 + 1, "a majority of the sentinels"
    sentinels = find(rendered, "StatefulSet", "redis-sentinel")["spec"]["replicas"]
    drained = find(rendered, "PodDisruptionBudget", "redis-sentinel")["spec"]["maxUnavailable"]
    assert quorum <= sentinels - drained, "a drain (one sentinel gone) keeps a quorum"


def test_nodes_and_sentinels_know_each_other_by_name(rendered: list[dict[str, Any]]) -> None:
    nodes = addresses(
        find(rendered, "StatefulSet", "redis-node"), find(rendered, "Service", "redis-node")
    )
    sentinels = addresses(
        find(rendered, "StatefulSet", "redis-sentinel"), find(rendered, "Service", "redis-sentinel")
    )
    node_env, sentinel_env = init_env(rendered, "redis-node"), init_env(rendered, "redis-sentinel")
    for env in (node_env, sentinel_env):
        assert env["NODES"].split() == nodes
        assert env["SENTINELS"].split() == sentinels
        assert env["MASTER_NAME"] == "dispatcher"
    assert node_env["SELF"] == nodes[1], "$(POD_NAME) is the pod's own name"
    assert sentinel_env["SELF"] == sentinels[1]
    # The sentinels' timers as documented (docs/high-availability.md).
    assert (sentinel_env["DOWN_AFTER_MS"], sentinel_env["FAILOVER_TIMEOUT_MS"]) == ("5000", "30000")


def test_data_nodes_keep_the_single_nodes_settings(rendered: list[dict[str, Any]]) -> None:
    single = yaml.safe_load_all((BASE / "redis.yaml").read_text())
    statefulset = next(doc for doc in single if doc["kind"] == "StatefulSet")
    (redis,) = statefulset["spec"]["template"]["spec"]["containers"]
    args = redis["args"]
    env = init_env(rendered, "redis-node")
    assert env["APPENDFSYNC"] == args[args.index("--appendfsync") + 1]
    assert int(env["MIN_REPLICAS_TO_WRITE"]) >= 1
    assert 0 < int(env["MIN_REPLICAS_MAX_LAG"]) <= 10
    node_pod = pod(rendered, "StatefulSet", "redis-node")
    (container,) = node_pod["containers"]
    assert container["resources"] == redis["resources"]
    assert container["command"] == ["redis-server", "/conf/redis.conf"]
    images = {c["image"] for c in [*node_pod["containers"], *node_pod["initContainers"]]}
    images |= {c["image"] for c in pod(rendered, "StatefulSet", "redis-sentinel")["containers"]}
    assert images == {redis["image"]}, "the same Redis image as the single node"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = find(rendered, "StatefulSet", "redis-node")["spec"]["volumeClaimTemplates"]
    assert [claim["metadata"]["name"] for claim in claims] == ["data"]
    assert mounts["data"] == env["DATA_DIR"], "the AOF on the volume"
    for name in ("redis-node", "redis-sentinel"):
        spec = pod(rendered, "StatefulSet", name)
        assert spec["securityContext"]["runAsNonRoot"] is True
        for item in [*spec["containers"], *spec["initContainers"]]:
            assert item["securityContext"]["allowPrivilegeEscalation"] is False
            assert item["securityContext"]["readOnlyRootFilesystem"] is True
            assert item["resources"]["limits"]["memory"]
            mounted = {m["name"]: m["mountPath"] for m in item["volumeMounts"]}
            if item in spec["initContainers"]:
                assert mounted["conf"] == init_env(rendered, name)["CONF_DIR"]


def test_the_scripts_mounted_are_the_repositorys(rendered: list[dict[str, Any]]) -> None:
    (scripts,) = [
        d for d in rendered
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("redis-sentinel-scripts")
    ]  # fmt: skip
    assert scripts["data"] == {
        NODE_SCRIPT.name: NODE_SCRIPT.read_text(),
        SENTINEL_SCRIPT.name: SENTINEL_SCRIPT.read_text(),
    }
    for name, script in (("redis-node", NODE_SCRIPT), ("redis-sentinel", SENTINEL_SCRIPT)):
        spec = pod(rendered, "StatefulSet", name)
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["scripts"]["configMap"]["name"] == scripts["metadata"]["name"]
        (init,) = spec["initContainers"]
        assert init["command"] == ["sh", f"/scripts/{script.name}"]


def test_passwords_come_from_the_secret(rendered: list[dict[str, Any]]) -> None:
    seen = 0
    for doc in rendered:
        if doc["kind"] not in ("StatefulSet", "Deployment"):
            continue
        spec = doc["spec"]["template"]["spec"]
        for item in [*spec.get("initContainers", []), *spec["containers"]]:
            for var in item.get("env", []):
                if "PASSWORD" in var["name"]:
                    assert "value" not in var, f"{doc['metadata']['name']}: {var['name']} inline"
                    assert var["valueFrom"]["secretKeyRef"]["name"] == AUTH_SECRET
                    seen += 1
    # Per StatefulSet: both in the init container, one in the server's; 2 per dispatcher pod.
    assert seen == 2 * 3 + 2 * len(DISPATCHER_PODS)
    settings_map = find(rendered, "ConfigMap", "dispatcher-settings")["data"]
    assert "REDIS_URL" not in settings_map, (
        "REDIS_URL (with the password) comes from each pod's env"
    )


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize("dispatcher_secrets", [{}, {"REDIS_URL": "redis://elsewhere:6379/0"}])
def test_dispatcher_pods_point_at_the_sentinels(
    rendered: list[dict[str, Any]], dispatcher_secrets: dict[str, str]
) -> None:
    """As the pods see it (the ConfigMap, the optional dispatcher-secrets, then env; the env's
    REDIS_URL wins), parsed by the dispatcher's own settings and URL parser."""
    configmaps = {"dispatcher-settings": find(rendered, "ConfigMap", "dispatcher-settings")["data"]}
    secrets = {
        **STAND_IN,
        **({"dispatcher-secrets": dispatcher_secrets} if dispatcher_secrets else {}),
    }
    sentinel_env = init_env(rendered, "redis-sentinel")
    for deployment, container_name in DISPATCHER_PODS.items():
        (container,) = pod(rendered, "Deployment", deployment)["containers"]
        assert container["name"] == container_name
        env = pod_env(container, configmaps, secrets)
        fields = {
            key.lower(): value for key, value in env.items() if key.lower() in Settings.model_fields
        }
        settings = Settings(_env_file=None, **fields)
        target = parse_sentinel_url(settings.redis_url)
        assert [f"{host}:{port}" for host, port in target.sentinels] == sentinel_env[
            "SENTINELS"
        ].split()
        assert target.password == STAND_IN[AUTH_SECRET]["password"]
        assert target.db == 0
        assert settings.redis_sentinel_master == sentinel_env["MASTER_NAME"]
        assert settings.redis_sentinel_password is not None
        assert (
            settings.redis_sentinel_password.get_secret_value()
            == STAND_IN[AUTH_SECRET]["sentinel-password"]
        )
        assert settings.min_replicas == 1
        assert "PASSWORD" not in json.dumps(container.get("args", []))


# === docker compose ===========================================================================


def profile_services(profile: str) -> set[str]:
    return {name for name, svc in services().items() if profile in svc.get("profiles", [])}


def test_the_sentinel_profile_has_the_same_topology() -> None:
    assert profile_services("sentinel") == {*HA_NODES, *HA_SENTINELS, *HA_DISPATCHERS}
    nodes = [f"{name}:6379" for name in HA_NODES]
    sentinels = [f"{name}:26379" for name in HA_SENTINELS]
    k8s_nodes = {k: v for k, v in component_init_env("redis-node").items() if k in COMPARED}
    k8s_sentinels = {k: v for k, v in component_init_env("redis-sentinel").items() if k in COMPARED}
    for names, own, k8s in ((HA_NODES, nodes, k8s_nodes), (HA_SENTINELS, sentinels, k8s_sentinels)):
        for name, address in zip(names, own, strict=True):
            svc = service(name)
            env = environment(svc)
            assert env["SELF"] == address
            assert env["NODES"].split() == nodes
            assert env["SENTINELS"].split() == sentinels
            assert {k: v for k, v in env.items() if k in COMPARED} == k8s, name
            assert "./deploy/k8s/redis-sentinel:/scripts:ro" in svc["volumes"]
            assert not svc.get("ports"), f"{name} must not be published"
    for name in HA_NODES:
        assert f"{name}-data:/data" in service(name)["volumes"], "each node's AOF on its own volume"


COMPARED = {"MASTER_NAME", "APPENDFSYNC", "MIN_REPLICAS_TO_WRITE", "MIN_REPLICAS_MAX_LAG",
            "HANDOVER_SECONDS", "QUORUM", "DOWN_AFTER_MS", "FAILOVER_TIMEOUT_MS"}  # fmt: skip


def compose_config(tmp_path: Path, *profiles: str, **shell: str) -> dict[str, dict[str, Any]]:
    cli = compose_cli()
    require_tool(cli is not None, "no Docker Compose v2 CLI (scripts/bootstrap.sh installs one)")
    assert cli is not None
    argv = [*cli, "-f", str(COMPOSE_FILE), "--project-directory", str(REPO)]
    for profile in profiles:
        argv += ["--profile", profile]
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = subprocess.run(
        [*argv, "--env-file", str(empty), "config", "--format", "json"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **shell},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found: dict[str, dict[str, Any]] = json.loads(result.stdout)["services"]
    return found


@pytest.mark.usefixtures("clean_env")
def test_the_sentinel_profiles_dispatchers_point_at_the_sentinels(tmp_path: Path) -> None:
    resolved = compose_config(
        tmp_path, "sentinel", REDIS_HA_PASSWORD="0a1b", REDIS_HA_SENTINEL_PASSWORD="2c3d"
    )
    assert resolved["redis-1"]["environment"]["REDIS_PASSWORD"] == "0a1b"
    assert resolved["sentinel-1"]["environment"]["SENTINEL_PASSWORD"] == "2c3d"
    for name in HA_DISPATCHERS:
        env = {k: v for k, v in resolved[name]["environment"].items() if v is not None}
        settings = Settings(_env_file=None, **{k.lower(): v for k, v in env.items()})
        target = parse_sentinel_url(settings.redis_url)
        assert [f"{h}:{p}" for h, p in target.sentinels] == [f"{s}:26379" for s in HA_SENTINELS]
        assert target.password == "0a1b"
        assert settings.redis_sentinel_master == "dispatcher"
        assert settings.redis_sentinel_password is not None
        assert settings.redis_sentinel_password.get_secret_value() == "2c3d"
        assert settings.min_replicas == 1
        assert set(resolved[name]["depends_on"]) == {*HA_SENTINELS, "torchserve"}
    # No password set: none on the nodes, and none in the dispatcher's URL.
    bare = compose_config(tmp_path, "sentinel")
    url = bare["api-sentinel"]["environment"]["REDIS_URL"]
    assert parse_sentinel_url(url).password is None
    assert Settings(_env_file=None, redis_url=url, redis_sentinel_master="dispatcher").redis_url


def test_the_default_profile_is_unchanged(tmp_path: Path) -> None:
    """Without --profile: the same services as before, on the single Redis; with it, those
    same services exactly as without (the profile only adds)."""
    default = compose_config(tmp_path)
    assert set(default) == DEFAULT_SERVICES
    assert default["api"]["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    for name, svc in default.items():
        assert set(svc.get("depends_on", {})) <= DEFAULT_SERVICES, name
    with_profile = compose_config(tmp_path, "sentinel")
    for name in DEFAULT_SERVICES:
        assert with_profile[name] == default[name], name
    published = {
        port["published"] for svc in with_profile.values() for port in svc.get("ports", [])
    }
    assert len(published) == len([p for s in with_profile.values() for p in s.get("ports", [])])
