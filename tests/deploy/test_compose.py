"""docker-compose.yml and .env.example, checked without a Docker engine.

Compose's healthchecks and start order, the modules the containers start, the settings they get,
the monitoring profile, and the example environment against `Settings`. `docker compose config`
(Docker Compose v2, client side: no engine) validates the file as Compose itself reads it;
scripts/bootstrap.sh installs the CLI where it runs as root.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from dotenv import dotenv_values

from shared.settings import Settings
from tests.support.deploy_files import (
    COMPOSE_FILE,
    DISPATCHER_DOCKERFILES,
    ENV_EXAMPLE,
    HEALTHCHECK_KEYS,
    REPO,
    RESTART_POLICIES,
    SERVICE_KEYS,
    SETTINGS_ENV_NAMES,
    TOP_LEVEL_KEYS,
    TORCHSERVE_CONFIG,
    build_of,
    comparable,
    compose,
    compose_cli,
    duration_seconds,
    env_example_names,
    environment,
    exec_form,
    final_stage,
    healthcheck_text,
    model_names,
    properties,
    service,
    services,
)
from tests.support.packaging import (
    check_entry_points,
)
from tests.support.stack import require_tool

# === docker-compose.yml ========================================================================

# Settings docker-compose.yml names without a value: compose passes them on from the shell or .env.
PASSED_ON = {"BACKENDS", "DEFAULT_BACKEND", "READY_BACKENDS"}


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    """Compose's own validation (its schema, interpolation, references), client side only."""
    cli = compose_cli()
    require_tool(cli is not None, "no Docker Compose v2 CLI (scripts/bootstrap.sh installs one)")
    assert cli is not None

    def config(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, "-f", str(path), "--project-directory", str(REPO), "config", "-q"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    result = config(COMPOSE_FILE)
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    # And it has teeth: a misspelt key is refused.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("stop_grace_period:", "stop_grace_perod:"))
    refused = config(broken)
    assert refused.returncode != 0
    assert "stop_grace_perod" in refused.stderr


def test_compose_structure() -> None:
    """The YAML's structure, pinned whatever the CLI accepts (it ignores `x-` keys, for one)."""
    data = compose()
    unknown = {key for key in data if not key.startswith("x-")} - TOP_LEVEL_KEYS
    assert not unknown, f"unknown top-level keys {unknown}"
    assert {"redis", "torchserve", "api", "worker"} <= set(services())
    for name, svc in services().items():
        assert set(svc) <= SERVICE_KEYS, f"{name}: unknown keys {set(svc) - SERVICE_KEYS}"
        assert ("image" in svc) != ("build" in svc), f"{name}: needs exactly one of image/build"
        assert svc.get("restart") in RESTART_POLICIES, f"{name}: no restart policy"
        for volume in svc.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in (data.get("volumes") or {}), f"{name}: undeclared {source}"


def test_every_dependency_is_waited_for_until_healthy() -> None:
    depended_on = set()
    for name, svc in services().items():
        depends_on = svc.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on needs the long form (condition)"
        for target, options in depends_on.items():
            assert target in services(), f"{name} depends on unknown service {target}"
            condition = options.get("condition") if isinstance(options, dict) else None
            assert condition == "service_healthy", f"{name} must wait for {target} to be healthy"
            depended_on.add(target)
    assert {"redis", "torchserve"} <= depended_on
    for api_dependency in ("redis", "torchserve"):
        assert api_dependency in service("api")["depends_on"]
        assert api_dependency in service("worker")["depends_on"]
    for name in depended_on | {"api"}:
        healthcheck = service(name).get("healthcheck")
        assert healthcheck, f"{name} needs a healthcheck"
        assert not healthcheck.get("disable"), f"{name} needs a healthcheck"
        assert set(healthcheck) <= HEALTHCHECK_KEYS, f"{name}: unknown healthcheck keys"
        test = healthcheck["test"]
        assert isinstance(test, list), f"{name}: healthcheck test must be a list"
        assert test[0] in {"CMD", "CMD-SHELL"}, f"{name}: healthcheck test must start with CMD"
        assert len(test) > 1, f"{name}: empty healthcheck"
        for key in ("interval", "timeout", "start_period"):
            if key in healthcheck:
                assert duration_seconds(healthcheck[key]) > 0


def test_redis_persists_and_is_checked_with_ping() -> None:
    redis = service("redis")
    assert str(redis["image"]).startswith("redis:7")
    command = redis["command"]
    argv = command if isinstance(command, list) else shlex.split(command)
    argv = [str(arg) for arg in argv]
    assert argv[0] == "redis-server"
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert options.get("--appendonly") == "yes", "Redis must run with AOF (--appendonly yes)"
    assert options.get("--appendfsync") == "everysec"
    assert options.get("--maxmemory-policy", "noeviction") == "noeviction", "tasks would be evicted"
    assert any(str(v).endswith(":/data") for v in redis.get("volumes", [])), "/data not persisted"
    assert "redis-cli ping" in healthcheck_text(redis)


def test_torchserve_is_healthy_only_when_every_model_is_ready() -> None:
    torchserve = service("torchserve")
    check = healthcheck_text(torchserve)
    management_port = urlsplit(properties(TORCHSERVE_CONFIG)["management_address"]).port
    assert f"127.0.0.1:{management_port}/models/" in check, "check the management API, not /ping"
    assert "READY" in check
    for model in model_names():
        assert re.search(rf"\b{re.escape(model)}\b", check), f"healthcheck ignores {model}"
    # Loading models takes a while: the healthcheck must not count as failing meanwhile.
    assert duration_seconds(torchserve["healthcheck"]["start_period"]) >= 30


@pytest.mark.usefixtures("clean_env")
def test_worker_scales_and_shuts_down_warm() -> None:
    worker = service("worker")
    # One name/port per replica: a fixed container name or host port stops the second replica,
    # and a fixed hostname merges their Celery node names and heartbeat keys.
    for fixed in ("container_name", "hostname", "ports"):
        assert fixed not in worker, f"worker `{fixed}` breaks `docker compose up --scale worker=N`"
    defaults = Settings(_env_file=None)
    # A task's default deadline plus one attempt's overrun (Settings.task_time_limit's shape).
    needed = defaults.dispatch_default_timeout + defaults.torchserve_connect_timeout + 5
    grace = duration_seconds(worker.get("stop_grace_period", "10s"))
    assert grace >= needed, f"stop_grace_period {grace}s < {needed}s: tasks cut off at shutdown"
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM", "SIGTERM is Celery's warm shutdown"


@pytest.mark.usefixtures("clean_env")
def test_api_and_worker_get_the_same_real_settings() -> None:
    api, worker = service("api"), service("worker")
    assert environment(api) == environment(worker), "API and workers must agree on settings"
    assert api.get("env_file") == worker.get("env_file")
    env = environment(api)
    unknown = set(env) - SETTINGS_ENV_NAMES
    assert not unknown, f"not Settings fields (typo? renamed?): {sorted(unknown)}"
    assert {"REDIS_URL", "TORCHSERVE_URL"} <= set(env)
    # The backends (whose JSON holds their tokens) are passed on from the shell or .env, never
    # written here: names without a value.
    passed_on = {name for name, value in api["environment"].items() if value is None}
    assert passed_on == PASSED_ON, passed_on
    set_here = {name: value for name, value in env.items() if name not in passed_on}
    settings = Settings(_env_file=None, **{name.lower(): value for name, value in set_here.items()})
    redis = urlsplit(settings.redis_url)
    assert redis.hostname == "redis", "REDIS_URL must name the compose service"
    assert (redis.port or 6379) == 6379
    torchserve = urlsplit(settings.torchserve_url)
    inference = urlsplit(properties(TORCHSERVE_CONFIG)["inference_address"])
    assert torchserve.hostname == "torchserve", "TORCHSERVE_URL must name the compose service"
    assert torchserve.port == inference.port
    assert inference.hostname == "0.0.0.0", "TorchServe must listen beyond its own container"
    for entry in api.get("env_file", []):
        spec = entry if isinstance(entry, dict) else {"path": entry}
        assert spec.get("required") is False or (REPO / spec["path"]).is_file()
        assert spec["path"] != ".env.example", "the example holds defaults, not deployment values"


@pytest.mark.usefixtures("clean_env")
def test_backends_reach_the_api_and_workers_from_the_environment(tmp_path: Path) -> None:
    """As Compose resolves the file: BACKENDS from an env file (a `$` in its token kept), the
    shell's value before the file's, and nothing set when neither has it."""
    cli = compose_cli()
    require_tool(cli is not None, "no Docker Compose v2 CLI (scripts/bootstrap.sh installs one)")
    assert cli is not None
    backends = '{"llm": {"url": "http://vllm:8000/v1", "protocol": "openai", "token": "a$b"}}'
    env_file = tmp_path / "backends.env"
    env_file.write_text(f"BACKENDS='{backends}'\nDEFAULT_BACKEND=llm\n")

    def resolved(env_path: Path, **shell: str) -> dict[str, dict[str, Any]]:
        argv = [*cli, "-f", str(COMPOSE_FILE), "--project-directory", str(REPO)]
        result = subprocess.run(
            [*argv, "--env-file", str(env_path), "config", "--format", "json"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **shell},
        )
        assert result.returncode == 0, result.stderr
        found: dict[str, dict[str, Any]] = json.loads(result.stdout)["services"]
        return found

    for name, svc in resolved(env_file).items():
        if name in ("api", "worker", "worker-interactive", "webhooks"):
            env = svc["environment"]
            # `$$` is Compose's spelling of a literal `$` in its output.
            assert env["BACKENDS"].replace("$$", "$") == backends, name
            assert env["DEFAULT_BACKEND"] == "llm", name
            assert env["READY_BACKENDS"] is None, name
    shell = resolved(env_file, DEFAULT_BACKEND="torchserve")["api"]["environment"]
    assert shell["DEFAULT_BACKEND"] == "torchserve"
    empty = tmp_path / "empty.env"
    empty.write_text("")
    unset = resolved(empty)["api"]["environment"]
    assert {name: unset[name] for name in PASSED_ON} == dict.fromkeys(PASSED_ON)


def test_only_the_api_is_published() -> None:
    api_ports = [str(port) for port in service("api").get("ports", [])]
    expose = final_stage("api").args("EXPOSE")
    assert expose == ["8000"]
    assert any(port.endswith(":8000") for port in api_ports), "the API is not published"
    for name in ("redis", "torchserve"):  # no auth on either: compose network only
        assert not service(name).get("ports"), f"{name} must not be published"


def test_every_dispatcher_container_starts_a_module_of_its_image() -> None:
    """Each container built from Dockerfile.api or Dockerfile.worker starts a module that the
    image holds (compose's `command`, else the image's CMD): a renamed module breaks this."""
    started = {}
    for name, svc in services().items():
        if "build" not in svc or build_of(name)[1].name not in DISPATCHER_DOCKERFILES:
            continue
        command = svc.get("command") or exec_form(final_stage(name).args("CMD")[-1], "CMD")
        assert isinstance(command, list), f"{name}: command in exec (list) form"
        started[name] = check_entry_points(command, f"docker-compose.yml `{name}`")
    assert started == {
        "api": ["api"],
        "worker": ["worker.app:app"],
        "worker-interactive": ["worker.app:app"],
        "webhooks": ["worker.webhook_app:app"],
        # The sentinel profile's (tests/deploy/test_redis_sentinel.py): the same, on Sentinel.
        "api-sentinel": ["api"],
        "worker-sentinel": ["worker.app:app"],
        "webhooks-sentinel": ["worker.webhook_app:app"],
    }


# === .env.example =============================================================================


def test_env_example_lists_exactly_the_settings() -> None:
    names = env_example_names()
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert not duplicates, f".env.example sets {duplicates} twice"
    assert set(names) == SETTINGS_ENV_NAMES, (
        f"missing: {sorted(SETTINGS_ENV_NAMES - set(names))}, "
        f"not settings: {sorted(set(names) - SETTINGS_ENV_NAMES)}"
    )
    assert set(dotenv_values(ENV_EXAMPLE)) == SETTINGS_ENV_NAMES  # as pydantic-settings reads it
    lines = ENV_EXAMPLE.read_text().splitlines()
    for index, line in enumerate(lines):
        if line.strip() and not line.startswith("#"):
            assert index > 0, f"no comment above {line!r}"
            assert lines[index - 1].startswith("# "), f"no comment above {line!r}"


@pytest.mark.usefixtures("clean_env")
def test_env_example_holds_the_defaults() -> None:
    from_example = Settings(_env_file=ENV_EXAMPLE)
    defaults = Settings(_env_file=None)
    assert comparable(from_example) == comparable(defaults)


@pytest.mark.usefixtures("clean_env")
def test_env_example_values_are_read_not_ignored(tmp_path: Path) -> None:
    """The check above means something: a changed value in such a file does change Settings."""
    changed = tmp_path / "changed.env"
    text = ENV_EXAMPLE.read_text()
    assert "\nMAX_DELIVERIES=3\n" in text
    changed.write_text(text.replace("\nMAX_DELIVERIES=3\n", "\nMAX_DELIVERIES=7\n"))
    assert Settings(_env_file=changed).max_deliveries == 7


# === monitoring profile =======================================================================

MONITORING = ("prometheus", "grafana")
# The sentinel profile's services (tests/deploy/test_redis_sentinel.py checks them).
SENTINEL_PROFILE = {"redis-1", "redis-2", "redis-3", "sentinel-1", "sentinel-2", "sentinel-3",
                    "api-sentinel", "worker-sentinel", "webhooks-sentinel"}  # fmt: skip
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"


def bind_mounts(svc: dict[str, Any]) -> dict[str, Path]:
    """Container path -> repository path of the service's bind mounts (`./x:/y[:ro]`)."""
    mounts = {}
    for volume in svc.get("volumes", []):
        source, _, rest = str(volume).partition(":")
        if source.startswith("./"):
            mounts[rest.split(":")[0]] = REPO / source
    return mounts


def test_monitoring_is_a_profile_the_default_stack_does_not_start() -> None:
    for name, svc in services().items():
        if name in MONITORING:
            assert svc.get("profiles") == ["monitoring"], f"{name} belongs to the profile"
        elif name in SENTINEL_PROFILE:
            assert svc.get("profiles") == ["sentinel"], f"{name} belongs to the profile"
        else:
            assert "profiles" not in svc, f"{name} must start with a plain `docker compose up`"
    for name in MONITORING:
        for port in service(name).get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


@pytest.mark.usefixtures("clean_env")
def test_prometheus_scrapes_the_api_and_every_worker_replica() -> None:
    prometheus = service("prometheus")
    mounts = bind_mounts(prometheus)
    for source in mounts.values():
        assert source.is_file(), f"{source} is mounted but missing"
    config_path = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config = yaml.safe_load(mounts[config_path.partition("=")[2]].read_text())
    for rule_file in config["rule_files"]:
        assert rule_file in mounts, f"{rule_file} is not mounted into the container"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api_port = exec_form(final_stage("api").args("CMD")[0], "CMD")
    api_target = f"api:{api_port[api_port.index('--port') + 1]}"
    assert jobs["dispatcher-api"]["static_configs"][0]["targets"] == [api_target]
    # One target per replica: DNS service discovery on the service name, not a fixed address.
    (dns,) = jobs["dispatcher-worker"]["dns_sd_configs"]
    assert dns["names"] == ["worker"]
    assert dns["type"] == "A"
    port = Settings(_env_file=None).worker_metrics_port
    assert dns["port"] == port
    assert str(port) in [str(item) for item in service("worker").get("expose", [])]
    assert "WORKER_METRICS_PORT" not in environment(service("worker")), "keep the default"
    assert "prometheus" in service("grafana").get("depends_on", {})


def test_grafana_loads_the_dashboard_from_the_prometheus_service() -> None:
    grafana = service("grafana")
    mounts = bind_mounts(grafana)
    assert REPO / "deploy" / "grafana" / "dispatcher.json" in mounts.values()
    provisioning = mounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus"
    listen = service("prometheus")["ports"][0].rsplit(":", 1)[1]
    assert source["url"] == f"http://prometheus:{listen}"
    dashboards = yaml.safe_load((provisioning / "dashboards" / "dispatcher.yml").read_text())
    (provider,) = dashboards["providers"]
    dashboard_dir = provider["options"]["path"]
    assert any(target.startswith(dashboard_dir + "/") for target in mounts), dashboard_dir
