"""Clients of the unit tests' bare redis-server (tests/unit/conftest.py), on an empty database."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest
import redis
import redis.asyncio as aioredis

from devstack.redis import RedisServer
from shared.redis_state.keys import FINISHED_CHANNEL

T = TypeVar("T")


@pytest.fixture
def r(bare_redis: RedisServer) -> Iterator[redis.Redis]:
    """A sync client (replies decoded) on an empty database."""
    client = bare_redis.client(decode_responses=True)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def run_async(bare_redis: RedisServer) -> Callable[[Callable[[aioredis.Redis], Awaitable[T]]], T]:
    """Runs `call(client)` with an asyncio client (replies decoded), as the API would."""

    def run(call: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        async def main() -> T:
            client = aioredis.Redis.from_url(bare_redis.url, decode_responses=True)
            try:
                return await call(client)
            finally:
                await client.aclose()

        return asyncio.run(main())

    return run


@pytest.fixture
def published(r: redis.Redis) -> Iterator[Callable[[], list[str]]]:
    """Every message on the finished channel so far, in order (subscribed before the test)."""
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(FINISHED_CHANNEL)
    pubsub.get_message(timeout=1)  # the subscription's confirmation
    seen: list[str] = []

    def messages() -> list[str]:
        while (message := pubsub.get_message(timeout=0.2)) is not None:
            seen.append(message["data"])
        return seen

    yield messages
    pubsub.close()
