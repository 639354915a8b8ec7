"""A redis-server for the console's tests (flushed before each)."""

from __future__ import annotations

import pytest

from devstack.redis import RedisServer


@pytest.fixture
def redis_url(bare_redis: RedisServer, clean_env: None) -> str:
    client = bare_redis.client()
    client.flushall()
    client.close()
    return bare_redis.url
