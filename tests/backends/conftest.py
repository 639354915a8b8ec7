"""Backend tests: the dispatcher against real MLServer, KServe and llama.cpp servers.

The servers, their venvs and the fixtures live in tests/support/servers/; the two hooks build
the venvs the selected tests need before the first test runs, and add server logs to failures.
"""

from tests.support.servers.fixtures import (
    kserve_server,
    llama_embedding_server,
    llama_server,
    mlserver,
    pytest_collection_finish,
    pytest_runtest_makereport,
)

__all__ = [
    "kserve_server",
    "llama_embedding_server",
    "llama_server",
    "mlserver",
    "pytest_collection_finish",
    "pytest_runtest_makereport",
]
