"""The unit tests' one bare redis-server (no AOF, no Celery, no TorchServe), for the whole run.

Every test that uses it empties it first (its own fixture flushes, e.g. `r` in
tests/unit/shared/redis_state/conftest.py), so tests do not see each other's keys; a test that
changes the server itself (a password, a kill) starts a server of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devstack.redis import RedisServer


@pytest.fixture(scope="session")
def bare_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("bare-redis"), appendonly=False) as server:
        yield server
