"""Backend tests: the dispatcher against real MLServer, KServe and llama.cpp servers.

The servers, their venvs and the fixtures live in tests/support/servers/; the two hooks build
the venvs the selected tests need before the first test runs, and add server logs to failures.
The dispatch tests' stacks (stack.py) add theirs through the BackendStackLogs plugin.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.backends.stack import LLAMA_API_KEY, BackendStackLogs
from tests.support.servers import llamacpp as llamacpp_support
from tests.support.servers.fixtures import (
    kserve_server,
    llama_embedding_server,
    llama_server,
    mlserver,
    pytest_collection_finish,
    pytest_runtest_makereport,
)
from tests.support.servers.running import RunningServer

__all__ = [
    "kserve_server",
    "llama_embedding_server",
    "llama_keyed_server",
    "llama_server",
    "mlserver",
    "pytest_collection_finish",
    "pytest_configure",
    "pytest_runtest_makereport",
]


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("backend-stack-logs"):
        config.pluginmanager.register(BackendStackLogs(), "backend-stack-logs")


@pytest.fixture(scope="session")
def llama_keyed_server(
    llama_server: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A llama.cpp server started with `--api_key LLAMA_API_KEY` (chat and completions).

    It asks for `llama_server` so that the session hook builds the llama.cpp venv first
    (prepare() then only finds it)."""
    root = tmp_path_factory.mktemp("llama-keyed")
    venv = llamacpp_support.prepare()
    with llamacpp_support.running(venv, root, api_key=LLAMA_API_KEY) as server:
        yield server
