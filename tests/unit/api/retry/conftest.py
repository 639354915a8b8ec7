"""The retry tests' settings: RETRY_KEEP_SECONDS=KEEP, two API keys, on a flushed server."""

from __future__ import annotations

import pytest

from devstack.processes import free_port
from devstack.redis import RedisServer
from shared.settings import Settings
from tests.unit.api.retry.harness import KEEP, KEY, OTHER_KEY


@pytest.fixture
def config(bare_redis: RedisServer, clean_env: None) -> Settings:
    client = bare_redis.client()
    client.flushall()
    client.close()
    return Settings(
        _env_file=None,
        redis_url=bare_redis.url,
        torchserve_url=f"http://127.0.0.1:{free_port()}",
        dispatcher_api_keys=f"{KEY},{OTHER_KEY}",
        retry_keep_seconds=KEEP,
    )
