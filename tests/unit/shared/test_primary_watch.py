"""Held connections follow a failover (shared/primary_watch.py) on a real Sentinel topology
(tests/support/sentinel.py): the result listener's subscription and the stream hub's XREAD are
on the new primary within a couple of seconds of a manual failover or of a frozen primary's
replacement, where without the watch they stay on the old node until it is demoted (~10 s) or
for as long as it is frozen."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import TypeVar

import pytest
import redis.asyncio as aioredis

from api.waiting import ResultWaiter
from devstack import wait_until
from shared.primary_watch import FOLLOW_SECONDS, PrimaryWatch
from shared.redis_connect import async_client
from shared.redis_state.keys import FINISHED_CHANNEL, task_key
from shared.redis_state.stream_reader import StreamHub
from shared.redis_state.stream_scripts import AppendToStream, StreamLimits
from shared.redis_state.streams import StreamKind
from shared.settings import Settings
from tests.support.sentinel import HOST, Node, SentinelTopology

T = TypeVar("T")
# From the sentinels naming the new primary to the held connection being there: one round of
# the watch, the reconnect's pause (api/waiting.py RECONNECT_SECONDS) and slack for a busy CI.
WITHIN = FOLLOW_SECONDS + 0.5 + 1.5
LIMITS = StreamLimits(max_entries=100, max_bytes=100_000, ttl=600)


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    with SentinelTopology(tmp_path_factory.mktemp("primary-watch")) as topology:
        yield topology


@pytest.fixture
def settings(topology: SentinelTopology, clean_env: None) -> Settings:
    for node in topology.nodes:  # what an earlier test froze
        if node.frozen:
            node.thaw()
    topology.settle()
    return Settings(
        _env_file=None,
        redis_url=topology.url,
        redis_sentinel_master=topology.master,
    )


def run(main: Awaitable[T]) -> T:
    return asyncio.run(asyncio.wait_for(main, 120))


def client_of(settings: Settings, timeout: float = 2.0) -> aioredis.Redis:
    return async_client(settings, socket_timeout=timeout, socket_connect_timeout=1.0)


async def until(probe: Callable[[], Awaitable[bool]], seconds: float, what: str) -> float:
    """Seconds until `probe()` is true; fails after `seconds`."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            if await probe():
                return time.monotonic() - started
        except (OSError, aioredis.RedisError):
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not within {seconds} s")


async def subscribers(node: Node) -> int:
    direct = aioredis.Redis(host=HOST, port=node.port, socket_timeout=1)
    try:
        counts = await direct.pubsub_numsub(FINISHED_CHANNEL)
        return int(counts[0][1])
    finally:
        await direct.aclose()


@asynccontextmanager
async def listening(settings: Settings) -> AsyncIterator[tuple[aioredis.Redis, PrimaryWatch]]:
    client = client_of(settings)
    waiter = ResultWaiter(client)
    watch = PrimaryWatch([client])
    await waiter.start()
    watch.start()
    try:
        await asyncio.wait_for(waiter.subscribed.wait(), 10)
        yield client, watch
    finally:
        await watch.stop()
        await waiter.stop()
        await client.aclose()


def test_a_plain_url_has_nothing_to_follow(clean_env: None) -> None:
    async def main() -> None:
        plain = Settings(_env_file=None, redis_url="redis://127.0.0.1:1/0")
        client = client_of(plain)
        watch = PrimaryWatch([client])
        watch.start()  # starts nothing: no task to stop, no sentinel to ask
        assert not watch.active
        await watch.stop()
        await client.aclose()

    run(main())


def test_the_result_listener_moves_to_the_new_primary_after_a_manual_failover(
    topology: SentinelTopology, settings: Settings
) -> None:
    async def main() -> None:
        async with listening(settings) as (_, watch):
            old = topology.primary()
            assert await subscribers(old) == 1
            new = await asyncio.to_thread(topology.failover)
            # The old primary is alive and not yet demoted: only the watch moves the listener.
            moved = await until(lambda: _is(subscribers(new), 1), WITHIN, "listener moved")
            assert await subscribers(old) == 0
            assert watch.moves >= 1
            print(f"listener on the new primary {moved:.2f} s after the sentinels named it")

    run(main())


def test_the_result_listener_leaves_a_frozen_primary(
    topology: SentinelTopology, settings: Settings
) -> None:
    async def main() -> None:
        async with listening(settings):
            old = topology.primary()
            old.freeze()  # the socket stays open and silent: no error reaches the listener
            try:
                new = await asyncio.to_thread(replaced, topology, old)
                await until(lambda: _is(subscribers(new), 1), WITHIN, "listener moved")
            finally:
                old.thaw()

    run(main())


def test_the_stream_hub_reads_the_new_primary_after_a_manual_failover(
    topology: SentinelTopology, settings: Settings
) -> None:
    async def main() -> None:
        reader = client_of(settings, timeout=5.0)
        writer = client_of(settings)
        watch = PrimaryWatch([reader, writer])
        task_id = uuid.uuid4().hex
        await writer.hset(task_key(task_id), mapping={"status": "running", "stream": "1"})
        append = AppendToStream(writer)
        try:
            async with StreamHub(reader, writer, block_ms=2_000) as hub:
                watch.start()
                subscription = hub.subscribe(task_id)
                await append(task_id, StreamKind.output, '"before"', attempt=1, limits=LIMITS)
                assert (await asyncio.wait_for(subscription.next(), 10)).data == '"before"'
                new = await asyncio.to_thread(topology.failover)
                # Written on the new primary itself (the old one is still up and a primary
                # for some seconds): the hub must be reading there to see it.
                on_new = aioredis.Redis(host=HOST, port=new.port, decode_responses=True)
                try:
                    await until(
                        lambda: _appended(AppendToStream(on_new), task_id),
                        WITHIN + 5,
                        "an append on the new primary",
                    )
                finally:
                    await on_new.aclose()
                started = time.monotonic()
                event = await asyncio.wait_for(subscription.next(), WITHIN)
                assert event.data == '"after"'
                print(f"hub event from the new primary after {time.monotonic() - started:.2f} s")
                subscription.close()
        finally:
            await watch.stop()
            await reader.aclose()
            await writer.aclose()

    run(main())


def replaced(topology: SentinelTopology, old: Node, seconds: float = 60) -> Node:
    """The new primary once the sentinels name one other than `old` (a frozen node cannot
    say what it is: the sentinels' word is what clients follow)."""

    def found() -> Node | None:
        port = topology.primary_port()
        return None if port in (None, old.port) else topology.node(port or 0)

    return wait_until(found, seconds, "a new primary")


async def _appended(append: AppendToStream, task_id: str) -> bool:
    outcome = await append(task_id, StreamKind.output, '"after"', attempt=1, limits=LIMITS)
    return outcome.outcome.value == "appended"


async def _is(count: Awaitable[int], expected: int) -> bool:
    return await count == expected
