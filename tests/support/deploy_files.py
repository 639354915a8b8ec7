"""What the deployment-file tests share: the parsed compose file, Dockerfiles, .dockerignore, the
packaging (pyproject.toml, requirements.lock), the entry points the containers start, and the
settings (tests/deploy/), checked without a Docker engine."""

from __future__ import annotations

import ast
import importlib.util
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
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


# --- what the dispatcher images install ---------------------------------------------------------


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def packaged() -> set[str]:
    """The top-level packages `pip install .` ships (pyproject.toml's packages.find)."""
    patterns = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    return {
        path.name
        for path in REPO.iterdir()
        if (path / "__init__.py").is_file()
        and any(fnmatchcase(path.name, pattern) for pattern in patterns)
    }


@cache
def locked() -> dict[str, str]:
    """requirements.lock as {canonical name: pinned version}."""
    pins = {}
    for raw in LOCK.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"requirements.lock: not a pin: {raw!r}"
            pins[canonicalize_name(name)] = version.split(";")[0].strip()
    return pins


def requirement_closure(requirements: Iterable[str]) -> dict[str, str]:
    """Every distribution `requirements` install here (markers for this interpreter, extras
    followed), as {canonical name: installed version}: read from the installed metadata."""
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    pending = [(Requirement(text), frozenset({""})) for text in requirements]
    while pending:
        requirement, wanted_by = pending.pop()
        marker = requirement.marker
        if marker and not any(marker.evaluate({"extra": extra}) for extra in wanted_by):
            continue
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(name)
        found[name] = dist.version
        extras = frozenset({"", *requirement.extras})
        pending += [(Requirement(text), extras) for text in dist.requires or []]
    return found


def module_defines(module: str, name: str) -> bool:
    """Whether `module` (found by import machinery, not imported) defines `name` at top level."""
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


def entry_points(argv: list[str]) -> list[tuple[str, str | None]]:
    """(module, attribute) that a container's command names: `celery -A m[:attr]` (Celery's
    default attribute: `app`), `python -m m`, `uvicorn m:attr`; none for other programs."""
    words = [str(word) for word in argv]
    found: list[tuple[str, str | None]] = []
    program = posixpath.basename(words[0]) if words else ""
    if program.startswith("python") and "-m" in words:
        module = words[words.index("-m") + 1]
        if module not in ("celery", "uvicorn"):
            found.append((module, None))
        words = words[words.index("-m") + 1 :]
        program = module
    if program == "celery":
        for flag in ("-A", "--app"):
            if flag in words:
                module, _, attribute = words[words.index(flag) + 1].partition(":")
                found.append((module, attribute or "app"))
    elif program == "uvicorn":
        target = next(word for word in words[1:] if not word.startswith("-"))
        module, _, attribute = target.partition(":")
        found.append((module, attribute))
    return found


def check_entry_points(argv: list[str], where: str) -> list[str]:
    """Assert that every module `argv` starts is one of the packages the images ship, defines
    what is named, and runs as `python -m` where that is how it starts; the modules, checked."""
    entries = entry_points(argv)
    assert entries, f"{where}: {argv} starts none of the dispatcher's modules"
    checked = []
    for module, attribute in entries:
        top = module.partition(".")[0]
        assert top in packaged(), f"{where}: {module} is not in a package the images install"
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{where}: no module {module} (renamed or moved?)"
        assert spec.origin, f"{where}: no module {module}"
        assert Path(spec.origin).is_relative_to(REPO / top), f"{where}: {module}: {spec.origin}"
        if attribute is None:  # python -m: a module, or a package with a __main__
            if spec.submodule_search_locations is not None:
                assert importlib.util.find_spec(f"{module}.__main__"), f"{where}: {module}"
        else:
            assert module_defines(module, attribute), f"{where}: {module} has no {attribute}"
        checked.append(module if attribute is None else f"{module}:{attribute}")
    return checked


def first_party_imports(package: str) -> dict[str, set[str]]:
    """{file: top-level repository packages it imports} for every module of `package`."""
    top_level = {path.name for path in REPO.iterdir() if path.is_dir()}
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.partition(".")[0])
        found[path.relative_to(REPO).as_posix()] = names & top_level
    return found
