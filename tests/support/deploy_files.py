"""What the deployment-file tests share: the parsed compose file, the Dockerfiles, .dockerignore
and the settings (tests/deploy/), checked without a Docker engine. What the images install is
tests/support/packaging.py's."""

from __future__ import annotations

import json
import posixpath
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr

from shared.settings import Settings
from tests.support.paths import REPO as REPO_ROOT

REPO = REPO_ROOT
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERIGNORE = REPO / ".dockerignore"
TORCHSERVE_CONFIG = REPO / "docker" / "torchserve" / "config.properties"
MODELS_DIR = REPO / "models"
PYPROJECT = REPO / "pyproject.toml"
LOCK = REPO / "requirements.lock"
# Repository tools: they run from a checkout (make run, make bench, make test), never in an image.
REPO_TOOLS = ("devstack", "bench", "tests")

SETTINGS_ENV_NAMES = {name.upper() for name in Settings.model_fields}
DISPATCHER_SERVICES = ("api", "worker")
DISPATCHER_DOCKERFILES = ("Dockerfile.api", "Dockerfile.worker")
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


def model_names() -> list[str]:
    names = []
    for path in sorted(MODELS_DIR.iterdir()):
        if path.is_dir() and not path.name.startswith((".", "_")):
            assert (path / "handler.py").is_file(), f"{path} has no handler.py"
            names.append(path.name)
    assert names
    return names
