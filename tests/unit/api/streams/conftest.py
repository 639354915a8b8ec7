"""The stream tests' settings (two API keys, an OpenAI-compatible backend) on a flushed server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from devstack.processes import free_port
from devstack.redis import RedisServer
from shared.settings import Settings
from tests.unit.api.streams.harness import BACKENDS, KEY, OTHER_KEY, T


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
        backends=json.dumps(BACKENDS),
    )


@pytest.fixture
def run() -> Callable[[Awaitable[T]], T]:
    def runner(main: Awaitable[T]) -> T:
        return asyncio.run(asyncio.wait_for(main, 30))

    return runner
