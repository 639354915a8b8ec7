"""deploy/k8s/redis-sentinel read for the tests: the component's files as written, the base with the
component as kustomize renders it (an overlay of our own, as deploy/README.md has users write
it), and the environment a pod of it sees (env after envFrom, `$(VAR)` expanded, secrets given
stand-in values)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.support.paths import REPO

BASE = REPO / "deploy" / "k8s"
COMPONENT = BASE / "redis-sentinel"
NODE_SCRIPT = COMPONENT / "redis-node-init.sh"
SENTINEL_SCRIPT = COMPONENT / "sentinel-init.sh"
# The Secret the component reads (created by hand, never in the repository).
AUTH_SECRET = "redis-auth"
_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def kubectl() -> str | None:
    return shutil.which("kubectl")


def overlay_text(directory: Path) -> str:
    """The overlay deploy/README.md shows, with paths relative to `directory`."""
    base = os.path.relpath(BASE, directory)
    component = os.path.relpath(COMPONENT, directory)
    return (
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {base}\ncomponents:\n  - {component}\n"
    )


def render(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` of the overlay written into `directory` (client side, offline)."""
    cli = kubectl()
    assert cli is not None
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(overlay_text(directory))
    result = subprocess.run(
        [cli, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@cache
def component_docs() -> list[dict[str, Any]]:
    """redis-sentinel.yaml as written (no kustomize needed)."""
    text = (COMPONENT / "redis-sentinel.yaml").read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def init_env(statefulset: str) -> dict[str, str]:
    """The plain values of a StatefulSet's init container env (secrets and fields left out)."""
    spec = find(component_docs(), "StatefulSet", statefulset)["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    return {item["name"]: str(item["value"]) for item in init["env"] if "value" in item}


def pod_env(
    container: dict[str, Any],
    configmaps: dict[str, dict[str, str]],
    secrets: dict[str, dict[str, str]],
    pod_name: str = "pod-0",
) -> dict[str, str]:
    """What a container's process sees, as the kubelet builds it: envFrom in order (an
    optional Secret that does not exist adds nothing), then env, each `$(VAR)` expanded from
    what is defined before it (an unknown one stays as written)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]])
        else:
            ref = source["secretRef"]
            if ref["name"] in secrets:
                env.update(secrets[ref["name"]])
            else:
                assert ref.get("optional"), f"Secret {ref['name']} is required and missing"
    for item in container.get("env", []):
        if "value" in item:
            value = _REFERENCE.sub(lambda m: env.get(m.group(1), m.group(0)), str(item["value"]))
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            value = secrets[ref["name"]][ref["key"]]
        else:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", item
            value = pod_name
        env[item["name"]] = value
    return env
