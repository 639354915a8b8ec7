"""Session fixtures for the real model servers: `mlserver`, `kserve_server`, `llama_server`,
`llama_embedding_server`; import them (and the two hooks) into a conftest.

Building a server's venv (and compiling llama.cpp) takes from 40 s to 6 minutes, longer than
pytest-timeout gives one test, whose setup would include it. So `pytest_collection_finish`
builds what the collected tests need before the first test starts (outside any timeout),
saying so on the terminal; the fixtures then only start the servers. A build that failed is
remembered and fails every test that needs it, with pip's output: a failure, never a skip.

`pytest_runtest_makereport` adds the end of each server's log to a failed test's report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

# Aliased: the fixtures' own names (`mlserver`) would shadow the modules.
from tests.support.servers import kserve as kserve_support
from tests.support.servers import llamacpp as llamacpp_support
from tests.support.servers import mlserver as mlserver_support
from tests.support.servers.running import RunningServer
from tests.support.servers.venvs import BuildError, Venv

Note = Callable[[str], None]
# Which venv each fixture needs, by name, and how it is built.
_PREPARERS: dict[str, tuple[str, Callable[[Note], Venv]]] = {
    "mlserver": ("mlserver", lambda note: mlserver_support.prepare()),
    "kserve_server": ("kserve", lambda note: kserve_support.prepare()),
    "llama_server": ("llama.cpp", llamacpp_support.prepare),
    "llama_embedding_server": ("llama.cpp", llamacpp_support.prepare),
}
_BUILT = pytest.StashKey[dict[str, Venv | str]]()  # server -> its venv, or why it failed


def _note_for(config: pytest.Config) -> Note:
    reporter = config.pluginmanager.get_plugin("terminalreporter")

    def note(message: str) -> None:
        if reporter is not None:
            reporter.write_line(f"model servers: {message}")
        else:
            print(f"model servers: {message}", flush=True)

    return note


def _prepare(config: pytest.Config, server: str, build: Callable[[Note], Venv]) -> Venv | str:
    """Build (or find) `server`'s venv once per session; a failure is kept as its message."""
    built = config.stash.setdefault(_BUILT, {})
    if server not in built:
        note = _note_for(config)
        started = time.monotonic()
        try:
            venv = build(note)
        except BuildError as error:
            built[server] = f"building the {server} venv failed:\n{error}"
            note(f"{server}: BUILD FAILED (the tests that need it will fail)")
        else:
            built[server] = venv
            seconds = time.monotonic() - started
            if seconds > 1:
                note(f"{server}: venv ready in {seconds:.0f} s ({venv.path.name})")
    return built[server]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build every server venv the selected tests use, before the first test (and its timeout)."""
    if session.config.option.collectonly:
        return
    used = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    for fixture, (server, build) in _PREPARERS.items():
        if fixture in used:
            _prepare(session.config, server, build)


def _venv(request: pytest.FixtureRequest, fixture: str) -> Venv:
    server, build = _PREPARERS[fixture]
    venv = _prepare(request.config, server, build)
    if isinstance(venv, str):
        pytest.fail(venv, pytrace=False)
    return venv


@pytest.fixture(scope="session")
def mlserver(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """MLServer 1.7.1 serving the scikit-learn `iris` model (version v1)."""
    root = tmp_path_factory.mktemp("mlserver")
    with mlserver_support.running(_venv(request, "mlserver"), root) as server:
        yield server


@pytest.fixture(scope="session")
def kserve_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """KServe 0.21.0 serving `digest` (BYTES -> sha256, length) and `sum` (FP32)."""
    root = tmp_path_factory.mktemp("kserve")
    with kserve_support.running(_venv(request, "kserve_server"), root) as server:
        yield server


@pytest.fixture(scope="session")
def llama_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """llama.cpp's OpenAI server on SmolLM2-135M (model `smollm2`): chat and completions."""
    root = tmp_path_factory.mktemp("llama")
    with llamacpp_support.running(_venv(request, "llama_server"), root) as server:
        yield server


@pytest.fixture(scope="session")
def llama_embedding_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A second llama.cpp server with `--embedding True`: /v1/embeddings."""
    root = tmp_path_factory.mktemp("llama-embedding")
    venv = _venv(request, "llama_embedding_server")
    with llamacpp_support.running(venv, root, embedding=True) as server:
        yield server


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failed test, append the end of the log of every model server it used."""
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        for value in funcargs.values():
            if isinstance(value, RunningServer):
                report.sections.append(
                    (f"{value.kind} log (end of {Path(value.log_path)})", value.log_tail())
                )
    return report
