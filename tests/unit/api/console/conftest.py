"""A redis-server for the console's tests (flushed before each)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.redis import RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(Path(tmp_path_factory.mktemp("console-redis")), appendonly=False) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer, clean_env: None) -> str:
    client = redis_server.client()
    client.flushall()
    client.close()
    return redis_server.url
