"""Dockerfile.api and Dockerfile.worker, checked without a Docker engine.

Read as text and held against the code: what the Dockerfiles copy, run and start, their users
and healthchecks. The TorchServe image is tests/deploy/test_torchserve_image.py's.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.celery_app import QUEUE
from shared.priorities import ALL_QUEUES
from shared.settings import Settings
from tests.support.deploy_files import (
    BUILT_SERVICES,
    DISPATCHER_SERVICES,
    LOCK,
    REPO,
    REPO_TOOLS,
    ROOT_USERS,
    Copy,
    build_of,
    context_files,
    copies,
    dockerfile_instructions,
    dockerfile_stages,
    dockerignored,
    exec_form,
    final_stage,
    healthcheck_cmd,
    healthcheck_text,
    parse_copy,
    service,
)
from tests.support.packaging import (
    check_entry_points,
    first_party_imports,
    locked,
    module_defines,
    packaged,
    pyproject,
    requirement_closure,
)

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
    assert re.search(r"pip install (-\S+ \S+ |--?\S+ )*\.(\s|$)", runs), "`pip install .` missing"
    assert not re.search(r"\btorch\b|\.\[", runs), "no torch or extras in the service images"
    # Every package pyproject.toml ships must be copied in, or `pip install .` leaves it out.
    copied = {source.strip("./") for stage in stages for c in copies(stage) for source in c.sources}
    assert packaged() == {"api", "worker", "shared"}
    for package in packaged():
        assert package in copied or "" in copied, f"{service_name}: {package}/ not copied"
    env = " ".join(stages[-1].args("ENV"))
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env), "logs must not sit in a buffer"


PIP_INSTALL = re.compile(r"\bpip install\b([^&|;]*)")


@pytest.mark.parametrize("service_name", DISPATCHER_SERVICES)
def test_python_images_install_every_version_from_the_lock(service_name: str) -> None:
    """Each `pip install` takes requirements.lock as constraints, once the lock is copied in."""
    stages = dockerfile_stages(build_of(service_name)[1])
    installs = []
    for stage in stages:
        lock_at = None
        for keyword, rest in stage.instructions:
            if keyword in ("COPY", "ADD"):
                copy = parse_copy(rest)
                if copy.from_stage is None and LOCK.name in copy.sources:
                    folder = copy.dest in (".", "./") or copy.dest.endswith("/")
                    lock_at = posixpath.normpath(
                        posixpath.join(copy.dest, LOCK.name) if folder else copy.dest
                    )
            elif keyword == "RUN":
                for match in PIP_INSTALL.finditer(rest):
                    args = shlex.split(match.group(1))
                    assert lock_at, f"{service_name}: pip install before {LOCK.name} is copied"
                    constraints = [
                        posixpath.normpath(following)
                        for flag, following in itertools.pairwise(args)
                        if flag in ("-c", "--constraint")
                    ]
                    assert lock_at in constraints, (
                        f"{service_name}: unpinned `pip install{match[1]}`"
                    )
                    installs.append(args)
    # The dependencies' layer and the project's own install.
    assert len(installs) == 2, installs
    assert installs[0][-2:] == ["-r", "/tmp/requirements.txt"]
    assert installs[1][-1] == "."


def test_the_lock_pins_everything_the_images_install() -> None:
    """[project]'s dependencies and all they pull in are pinned, at the versions tested here."""
    dependencies = pyproject()["project"]["dependencies"]
    installed = requirement_closure(dependencies)
    assert {"celery", "kombu", "redis", "hiredis", "fastapi", "uvicorn", "uvloop"} <= set(installed)
    assert "torch" not in installed, "the service images must not pull torch in"
    pins = locked()
    unpinned = sorted(set(installed) - set(pins))
    assert not unpinned, f"{LOCK.name} does not pin {unpinned}: run scripts/lock.sh"
    # scripts/bootstrap.sh installs this venv with the lock as constraints: the suite ran on them.
    drift = {name: (v, pins[name]) for name, v in installed.items() if v != pins[name]}
    assert not drift, f"installed versions differ from {LOCK.name}: {drift}"


@pytest.mark.parametrize("service_name", DISPATCHER_SERVICES)
def test_python_images_carry_no_repository_tools(service_name: str) -> None:
    context, dockerfile = build_of(service_name)
    sent = [
        file
        for stage in dockerfile_stages(dockerfile)
        for copy in copies(stage)
        if copy.from_stage is None
        for source in copy.sources
        for file in context_files(context, context / source)
    ]
    assert "api/main.py" in sent
    assert "worker/app.py" in sent
    leaked = sorted(file for file in sent if file.split("/")[0] in REPO_TOOLS)
    assert not leaked, f"{service_name} copies repository tools: {leaked[:5]}"
    lua = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "shared").rglob("*.lua"))
    assert lua
    assert set(lua) <= set(sent), "the Redis scripts must reach the image"
    for tool in REPO_TOOLS:
        assert (REPO / tool).is_dir()
        assert dockerignored(f"{tool}/__init__.py"), f"{tool}/ would be sent to the build"
        assert tool not in packaged(), f"`pip install .` would ship {tool}/"


def test_the_services_import_no_repository_tool() -> None:
    """What the images run imports only what they hold (devstack, bench, tests stay out)."""
    for package in sorted(packaged()):
        for file, imported in first_party_imports(package).items():
            assert imported <= packaged(), f"{file} imports {sorted(imported - packaged())}"


def _replicate(context: Path, copy: Copy, target: Path) -> None:
    """What a COPY instruction puts into the stage's working directory, copied into `target`."""
    for source in copy.sources:
        root = context / source
        for relative in context_files(context, root):
            if root.is_dir():
                path = target / copy.dest / Path(relative).relative_to(root.relative_to(context))
            elif copy.dest in (".", "./") or copy.dest.endswith("/"):
                path = target / copy.dest / root.name
            else:
                path = target / copy.dest
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(context / relative, path)


# Imports the services from the built wheel and the third-party packages alone: `python -S`
# processes no .pth file (so no editable install) and puts neither the repository nor the
# working directory's packages on sys.path.
IMPORT_FROM_WHEEL = """
import sys
site, packages = sys.argv[1], sys.argv[2:]
sys.path[:0] = [site, *packages]
import api.__main__, api.main, worker.app, worker.webhook_app
from shared.redis_state import loader
scripts = [loader.source(name) for name in loader.script_names()]
for name in ("api.main", "worker.app", "worker.webhook_app", "shared.redis_state.loader"):
    assert sys.modules[name].__file__.startswith(site), sys.modules[name].__file__
print(len(scripts))
"""


@pytest.mark.parametrize("service_name", DISPATCHER_SERVICES)
def test_the_image_build_installs_the_services_and_their_redis_scripts(
    service_name: str, tmp_path: Path
) -> None:
    """`pip install .` on exactly what the Dockerfile copies: the wheel holds api/, worker/ and
    shared/ with its .lua files, and the apps import from it without the repository."""
    context, dockerfile = build_of(service_name)
    (stage,) = [
        s
        for s in dockerfile_stages(dockerfile)
        for rest in s.args("RUN")
        for match in PIP_INSTALL.finditer(rest)
        if shlex.split(match[1])[-1:] == ["."]
    ]
    source = tmp_path / "src"
    for copy in copies(stage):
        assert copy.from_stage is None
        _replicate(context, copy, source)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "--wheel-dir", str(tmp_path / "wheel"), str(source)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    top_level = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top_level == packaged() == {"api", "worker", "shared"}
    lua = {p.relative_to(REPO).as_posix() for p in (REPO / "shared").rglob("*.lua")}
    assert lua <= set(names), sorted(lua - set(names))
    paths = sysconfig.get_paths()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    imported = subprocess.run(
        [sys.executable, "-S", "-c", IMPORT_FROM_WHEEL, str(tmp_path / "site"),
         paths["purelib"], paths["platlib"]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr[-3000:]
    library = 1  # lib.lua is prepended to the others, not a script of its own
    assert int(imported.stdout.split()[-1]) == len(lua) - library


async def status_of(app: Any, path: str) -> int:
    """GET `path` from an ASGI app in-process; its lifespan does not run."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        return (await client.get(path)).status_code


@pytest.mark.usefixtures("clean_env")
def test_api_image_starts_the_app_factory_and_checks_health() -> None:
    stage = final_stage("api")
    (cmd_rest,) = stage.args("CMD")
    cmd = exec_form(cmd_rest, "CMD")
    # `python -m api` execs uvicorn with API_WORKERS processes (api/__main__.py).
    assert cmd[:3] == ["python", "-m", "api"]
    assert check_entry_points(cmd, "Dockerfile.api CMD") == ["api"]
    from api.__main__ import parse, uvicorn_command

    uvicorn = uvicorn_command(parse(cmd[3:]), workers=1)
    assert uvicorn[1:3] == ["-m", "uvicorn"]
    assert "--factory" in uvicorn, f"{uvicorn[3]} is an app factory"
    module, _, factory = uvicorn[3].partition(":")
    assert module_defines(module, factory), f"{uvicorn[3]} does not exist"
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
    assert module_defines(module, attribute or "app"), f"{app_path} has no Celery app"
    assert check_entry_points(cmd, "Dockerfile.worker CMD") == ["worker.app:app"]
    queues = cmd[cmd.index("-Q") + 1].split(",")
    assert queues == list(ALL_QUEUES), "the worker must consume every queue the API fills"
    assert QUEUE in queues
    assert cmd[cmd.index("--pool") + 1] == "threads"
    assert {"--without-gossip", "--without-mingle"} <= set(cmd)
