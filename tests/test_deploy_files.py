"""The deployment files, checked without a Docker engine.

docker-compose.yml, Dockerfile.api, Dockerfile.worker, docker/torchserve/ and .env.example are
read as text and held against the code: compose's healthchecks and start order, the settings the
containers get, what the Dockerfiles copy, run and start, the archived models, and the example
environment against `Settings`. When a Docker Compose v2 CLI is installed, `docker compose config`
(client-side, no engine) validates the compose file too.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from dotenv import dotenv_values
from pydantic import SecretStr

from shared.celery_app import QUEUE
from shared.priorities import ALL_QUEUES
from shared.settings import Settings

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERIGNORE = REPO / ".dockerignore"
TORCHSERVE_CONFIG = REPO / "docker" / "torchserve" / "config.properties"
MODELS_DIR = REPO / "models"

SETTINGS_ENV_NAMES = {name.upper() for name in Settings.model_fields}
DISPATCHER_SERVICES = ("api", "worker")
BUILT_SERVICES = ("api", "worker", "torchserve")
ROOT_USERS = {"root", "0"}

# Service and healthcheck keys of the Compose Specification that this stack may use: a typo
# (`healthckeck`, `depends-on`) would otherwise be ignored by the YAML checks.
SERVICE_KEYS = {
    "build", "image", "command", "entrypoint", "environment", "env_file", "depends_on",
    "healthcheck", "ports", "expose", "volumes", "restart", "stop_grace_period", "stop_signal",
    "init", "container_name", "hostname", "deploy", "networks", "user", "working_dir", "labels",
    "logging", "ulimits", "read_only", "tmpfs", "security_opt", "cap_add", "cap_drop",
    "profiles", "shm_size", "mem_limit", "cpus", "pull_policy",
}  # fmt: skip
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval"}
TOP_LEVEL_KEYS = {"name", "services", "volumes", "networks", "configs", "secrets", "include"}
RESTART_POLICIES = {"always", "unless-stopped", "on-failure"}

DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# --- compose --------------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


def services() -> dict[str, dict[str, Any]]:
    found = compose().get("services")
    assert isinstance(found, dict), "docker-compose.yml has no services"
    assert found, "docker-compose.yml has no services"
    return found


def service(name: str) -> dict[str, Any]:
    assert name in services(), f"docker-compose.yml has no `{name}` service"
    return services()[name]


def environment(svc: dict[str, Any]) -> dict[str, str]:
    """A service's `environment`, in either of compose's spellings (mapping or KEY=value list)."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(key): str(value) for key, value in env.items()}


def duration_seconds(value: str | int | float) -> float:
    """A compose duration (`1m30s`, `500ms`, `10s`) in seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = DURATION_PART.findall(value)
    assert "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    assert parts, f"bad duration {value!r}"
    return sum(float(number) * DURATION_UNITS[unit] for number, unit in parts)


def healthcheck_text(svc: dict[str, Any]) -> str:
    test = svc["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def compose_cli() -> list[str] | None:
    """`docker compose` (v2, client side only) if installed and working, else None."""
    candidates = []
    if docker := shutil.which("docker"):
        candidates.append([docker, "compose"])
    if standalone := shutil.which("docker-compose"):
        candidates.append([standalone])
    for cli in candidates:
        probe = subprocess.run(
            [*cli, "version", "--short"], capture_output=True, text=True, timeout=60, check=False
        )
        # v1 (docker-compose 1.x) predates `env_file: {path, required}`; only v2 understands it.
        if probe.returncode == 0 and probe.stdout.strip().lstrip("v").startswith("2"):
            return cli
    return None


# --- Dockerfiles ----------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for key, rest in self.instructions if key == keyword]


@dataclass
class Copy:
    sources: list[str]
    dest: str
    from_stage: str | None


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuations joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # comments may sit inside a continuation too
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path.name} ends inside a line continuation"
    return result


def dockerfile_stages(path: Path) -> list[Stage]:
    stages: list[Stage] = []
    for keyword, rest in dockerfile_instructions(path):
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append(Stage(base=words[0], name=name))
        elif keyword != "ARG" or stages:  # ARGs before the first FROM only feed FROM lines
            assert stages, f"{path.name}: {keyword} before FROM"
            stages[-1].instructions.append((keyword, rest))
    assert stages, f"{path.name} has no FROM"
    return stages


def exec_form(rest: str, what: str) -> list[str]:
    """A JSON-array (exec form) argument list: the process is PID 1 and receives SIGTERM."""
    assert rest.startswith("["), f"{what} must use the exec (JSON array) form, not {rest!r}"
    value = json.loads(rest)
    assert isinstance(value, list), f"{what}: {rest!r} is not a JSON array"
    assert all(isinstance(v, str) for v in value), f"{what}: {rest!r}"
    return value


def parse_copy(rest: str) -> Copy:
    words = shlex.split(rest)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    args = json.loads(" ".join(words)) if words and words[0].startswith("[") else words
    assert len(args) >= 2, f"COPY needs a source and a destination: {rest!r}"
    return Copy(sources=args[:-1], dest=args[-1], from_stage=flags.get("from"))


def copies(stage: Stage) -> list[Copy]:
    return [parse_copy(rest) for rest in stage.args("COPY") + stage.args("ADD")]


def healthcheck_cmd(stage: Stage) -> list[str]:
    (rest,) = stage.args("HEALTHCHECK")  # exactly one
    match = re.fullmatch(r"(?:--\S+\s+)*CMD\s+(.+)", rest, re.DOTALL)
    assert match, f"HEALTHCHECK without CMD: {rest!r}"
    return exec_form(match.group(1).strip(), "HEALTHCHECK")


def build_of(service_name: str) -> tuple[Path, Path]:
    """(context directory, Dockerfile) of a compose service."""
    build = service(service_name).get("build")
    assert isinstance(build, dict), f"`{service_name}` must be built (build: context/dockerfile)"
    context = (REPO / build.get("context", ".")).resolve()
    dockerfile = context / build.get("dockerfile", "Dockerfile")
    assert context.is_dir(), f"build context {context} does not exist"
    assert dockerfile.is_file(), f"{dockerfile} does not exist"
    return context, dockerfile


def final_stage(service_name: str) -> Stage:
    return dockerfile_stages(build_of(service_name)[1])[-1]


# --- .dockerignore (moby's patternmatcher semantics) ------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        else:
            char = pattern[i]
            out.append({"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char)))
            i += 1
    return re.compile("^" + "".join(out) + "$")


@cache
def dockerignore_rules() -> list[tuple[re.Pattern[str], bool]]:
    """(pattern, excludes) in file order; the last pattern matching a path decides."""
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = posixpath.normpath(line.removeprefix("!").strip().lstrip("/"))
        assert "[" not in pattern, f"character classes are not checked here: {line!r}"
        rules.append((_ignore_regex(pattern), not keep))
    return rules


def dockerignored(relative: str) -> bool:
    """Whether a path (relative to the context) is left out of the build context."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # parents match too
    excluded = False
    for regex, excludes in dockerignore_rules():
        if any(regex.match(candidate) for candidate in candidates):
            excluded = excludes
    return excluded


def context_files(context: Path, source: Path) -> Iterator[str]:
    """Files under `source` (a file or a directory) that the build context sends."""
    paths = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for path in paths:
        relative = path.relative_to(context).as_posix()
        if not dockerignored(relative):
            yield relative


# --- settings ---------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No settings from this process's environment: only what the test passes counts."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)


def comparable(settings: Settings) -> dict[str, Any]:
    """Field values with secrets revealed; an empty secret counts as none (it sends nothing)."""

    def reveal(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value() or None
        if isinstance(value, list):
            return [reveal(item) for item in value]
        return value

    return {name: reveal(getattr(settings, name)) for name in Settings.model_fields}


def env_example_names() -> list[str]:
    names = []
    for number, raw in enumerate(ENV_EXAMPLE.read_text().splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            name, sep, _ = line.partition("=")
            assert sep, f".env.example:{number}: not KEY=value: {raw!r}"
            assert name == name.strip(), f".env.example:{number}: spaces around the name"
            names.append(name)
    return names


def properties(path: Path) -> dict[str, str]:
    result = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "!")):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not key=value: {raw!r}"
            result[key.strip()] = value.strip()
    return result


# === docker-compose.yml ========================================================================


def test_compose_validates() -> None:
    """`docker compose config` when the CLI is there; the YAML's structure in any case."""
    cli = compose_cli()
    if cli is not None:
        result = subprocess.run(
            [*cli, "-f", str(COMPOSE_FILE), "config", "-q"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    # Without the CLI these are the whole validation; with it they still pin the structure.
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
    settings = Settings(_env_file=None, **{name.lower(): value for name, value in env.items()})
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


def test_only_the_api_is_published() -> None:
    api_ports = [str(port) for port in service("api").get("ports", [])]
    expose = final_stage("api").args("EXPOSE")
    assert expose == ["8000"]
    assert any(port.endswith(":8000") for port in api_ports), "the API is not published"
    for name in ("redis", "torchserve"):  # no auth on either: compose network only
        assert not service(name).get("ports"), f"{name} must not be published"


# === Dockerfiles ==============================================================================


@pytest.mark.parametrize("service_name", BUILT_SERVICES)
def test_final_stage_runs_as_non_root(service_name: str) -> None:
    users = final_stage(service_name).args("USER")
    assert users, f"{service_name}: the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ROOT_USERS, f"{service_name} runs as root"
    if service_name in DISPATCHER_SERVICES:
        assert user.isdigit(), "use a numeric uid (runAsNonRoot can verify only those)"
        assert int(user) >= 1000, "a uid of its own, not a system one"


@pytest.mark.parametrize("service_name", BUILT_SERVICES)
def test_copy_sources_exist_and_reach_the_build(service_name: str) -> None:
    context, dockerfile = build_of(service_name)
    stages = dockerfile_stages(dockerfile)
    stage_names = {stage.name for stage in stages if stage.name}
    checked = 0
    for stage in stages:
        for copy in copies(stage):
            if copy.from_stage is not None:
                assert copy.from_stage in stage_names, f"COPY --from={copy.from_stage}: no stage"
                continue
            for source in copy.sources:
                matches = sorted(context.glob(source.rstrip("/"))) or [context / source]
                for path in matches:
                    assert path.exists(), f"{dockerfile.name}: COPY {source}: not in the repo"
                    sent = list(context_files(context, path))
                    assert sent, f"{dockerfile.name}: COPY {source}: excluded by .dockerignore"
                    checked += 1
    assert checked


def test_dockerignore_keeps_secrets_and_clutter_out() -> None:
    left_out = (
        ".venv/bin/python", ".git/HEAD", ".env", ".env.production", "tests/x.py", ".local/state",
        "api/__pycache__/main.cpython-311.pyc", ".mypy_cache/x",
    )  # fmt: skip
    for path in left_out:
        assert dockerignored(path), f"{path} would be sent to the build"
    for kept in ("pyproject.toml", "api/main.py", "models/echo/handler.py",
                 "docker/torchserve/config.properties"):  # fmt: skip
        assert not dockerignored(kept), f"{kept} would be missing from the build"


@pytest.mark.parametrize("service_name", DISPATCHER_SERVICES)
def test_python_image_installs_the_project_without_extras(service_name: str) -> None:
    stages = dockerfile_stages(build_of(service_name)[1])
    for stage in stages:
        assert re.fullmatch(r"(python:3\.11-slim|\$\{PYTHON_IMAGE\})", stage.base), stage.base
    args = dockerfile_instructions(build_of(service_name)[1])
    python_image = [rest for key, rest in args if key == "ARG" and rest.startswith("PYTHON_IMAGE")]
    assert python_image in ([], ["PYTHON_IMAGE=python:3.11-slim"])
    runs = " ".join(rest for stage in stages for rest in stage.args("RUN"))
    assert re.search(r"pip install (--?\S+ )*\.(\s|$)", runs), "`pip install .` missing"
    assert not re.search(r"\btorch\b|\.\[", runs), "no torch or extras in the service images"
    # Every package pyproject.toml ships must be copied in, or `pip install .` leaves it out.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {source.strip("./") for stage in stages for c in copies(stage) for source in c.sources}
    for package in (pattern.rstrip("*") for pattern in packages):
        if (REPO / package / "__init__.py").is_file():
            assert package in copied or "" in copied, f"{service_name}: {package}/ not copied"
    env = " ".join(stages[-1].args("ENV"))
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env), "logs must not sit in a buffer"


async def status_of(app: Any, path: str) -> int:
    """GET `path` from an ASGI app in-process; its lifespan does not run."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        return (await client.get(path)).status_code


def _module_defines(module: str, name: str) -> bool:
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"no module {module}"
    assert spec.origin, f"no module {module}"
    tree = ast.parse(Path(spec.origin).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name == name:
                return True
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
    return False


@pytest.mark.usefixtures("clean_env")
def test_api_image_starts_the_app_factory_and_checks_health() -> None:
    stage = final_stage("api")
    (cmd_rest,) = stage.args("CMD")
    cmd = exec_form(cmd_rest, "CMD")
    assert cmd[0] == "uvicorn"
    assert "--factory" in cmd, f"{cmd[1]} is an app factory"
    module, _, factory = cmd[1].partition(":")
    assert _module_defines(module, factory), f"{cmd[1]} does not exist"
    port = cmd[cmd.index("--port") + 1]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert stage.args("EXPOSE") == [port]
    check = " ".join(healthcheck_cmd(stage))
    path = re.search(rf"http://127\.0\.0\.1:{port}(/\w+)", check)
    assert path, f"the image's HEALTHCHECK does not call port {port}"
    assert path.group(0) in healthcheck_text(service("api"))
    # The app the factory builds answers it: liveness needs neither Redis nor TorchServe
    # (the client runs no lifespan, so nothing connects anywhere).
    from api.main import create_app

    app = create_app(Settings(_env_file=None))
    assert asyncio.run(status_of(app, path.group(1))) == 200


def test_worker_image_starts_the_celery_app_on_the_dispatch_queue() -> None:
    (cmd_rest,) = final_stage("worker").args("CMD")
    cmd = exec_form(cmd_rest, "CMD")
    assert cmd[:1] == ["celery"]
    assert "worker" in cmd
    app_path = cmd[cmd.index("-A") + 1]
    module, _, attribute = app_path.partition(":")
    assert _module_defines(module, attribute or "app"), f"{app_path} has no Celery app"
    queues = cmd[cmd.index("-Q") + 1].split(",")
    assert queues == list(ALL_QUEUES), "the worker must consume every queue the API fills"
    assert QUEUE in queues
    assert cmd[cmd.index("--pool") + 1] == "threads"
    assert {"--without-gossip", "--without-mingle"} <= set(cmd)


# === TorchServe ===============================================================================


def model_names() -> list[str]:
    names = []
    for path in sorted(MODELS_DIR.iterdir()):
        if path.is_dir() and not path.name.startswith((".", "_")):
            assert (path / "handler.py").is_file(), f"{path} has no handler.py"
            names.append(path.name)
    assert names
    return names


def archiver_calls(stage: Stage) -> list[dict[str, str]]:
    """The options of every `torch-model-archiver` command in the stage's RUN lines."""
    calls = []
    for rest in stage.args("RUN"):
        commands = re.split(r"\s*(?:&&|\|\||;)\s*", rest)
        for words in (shlex.split(command) for command in commands):
            if words[:1] != ["torch-model-archiver"]:
                continue
            options = {}
            for word, following in zip(words[1:], [*words[2:], ""], strict=True):
                if word.startswith("--"):
                    options[word] = "" if following.startswith("--") else following
            calls.append(options)
    return calls


def test_torchserve_image_archives_every_model() -> None:
    context, dockerfile = build_of("torchserve")
    stages = dockerfile_stages(dockerfile)
    assert all(stage.base in {"pytorch/torchserve:0.12.0-cpu", "${TORCHSERVE_IMAGE}"}
               for stage in stages)  # fmt: skip
    args = dockerfile_instructions(dockerfile)
    assert ("ARG", "TORCHSERVE_IMAGE=pytorch/torchserve:0.12.0-cpu") in args or all(
        stage.base == "pytorch/torchserve:0.12.0-cpu" for stage in stages
    )
    archived: dict[str, tuple[Stage, dict[str, str]]] = {}
    for stage in stages:
        for call in archiver_calls(stage):
            assert call["--model-name"] not in archived, f"{call['--model-name']} archived twice"
            archived[call["--model-name"]] = (stage, call)
    assert sorted(archived) == model_names(), "every models/<name>/ is archived, nothing else"
    export_paths = set()
    for name, (stage, call) in archived.items():
        handler = call["--handler"]
        origin = next(
            (
                (copy.sources[0], handler.removeprefix(copy.dest.rstrip("/") + "/"))
                for copy in copies(stage)
                if copy.from_stage is None and handler.startswith(copy.dest.rstrip("/") + "/")
            ),
            None,
        )
        assert origin, f"{name}: handler {handler} is not copied into the image"
        source = context / origin[0] / origin[1]
        assert source == MODELS_DIR / name / "handler.py", f"{name} is built from {source}"
        export_paths.add(posixpath.normpath(call["--export-path"]))
    (export_path,) = export_paths
    model_store = properties(TORCHSERVE_CONFIG)["model_store"]
    final = stages[-1]
    if archived[model_names()[0]][0] is not final:  # archived in a build stage: copied over?
        assert any(
            copy.from_stage is not None
            and posixpath.normpath(copy.sources[0]) == export_path
            and posixpath.normpath(copy.dest) == model_store
            for copy in copies(final)
        ), f"the archives in {export_path} never reach {model_store}"
    else:
        assert export_path == model_store


def test_torchserve_image_starts_with_the_config_in_the_foreground() -> None:
    context, dockerfile = build_of("torchserve")
    final = dockerfile_stages(dockerfile)[-1]
    (entrypoint,) = final.args("ENTRYPOINT")
    argv = exec_form(entrypoint, "ENTRYPOINT")
    assert argv[0] == "torchserve"
    assert "--foreground" in argv, "the container must end when TorchServe does"
    config_in_image = argv[argv.index("--ts-config") + 1]
    assert any(
        copy.dest == config_in_image
        and context / copy.sources[0] == TORCHSERVE_CONFIG
        and copy.from_stage is None
        for copy in copies(final)
    ), f"{TORCHSERVE_CONFIG.name} is not copied to {config_in_image}"
    check = " ".join(healthcheck_cmd(final))
    for model in model_names():
        assert re.search(rf"\b{re.escape(model)}\b", check), f"HEALTHCHECK ignores {model}"
    assert "READY" in check
    assert "/models/" in check


def test_torchserve_config() -> None:
    config = properties(TORCHSERVE_CONFIG)
    assert urlsplit(config["inference_address"]).port == 8080
    assert urlsplit(config["management_address"]).port == 8081
    assert urlsplit(config["metrics_address"]).port == 8082
    # The management API can register models from any URL: never beyond the container.
    assert urlsplit(config["management_address"]).hostname == "127.0.0.1"
    assert config["load_models"] == "all"
    assert config["model_store"] == "/home/model-server/model-store"
    assert config["disable_token_authorization"] == "true"
    assert config["enable_model_api"] == "true"
    assert int(config["default_workers_per_model"]) >= 1


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
