"""The stream hub against a bare redis-server: many subscribers on few connections, a new
subscriber served while the hub blocks, late readers, resume, slow readers, unsubscribe."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import pytest
import redis
import redis.asyncio as aioredis

from devstack.redis import RedisServer
from shared.redis_state.keys import HUB_WAKE_KEY_PREFIX
from shared.redis_state.stream_reader import StreamHub, Subscription
from shared.redis_state.stream_scripts import AppendToStream, StreamLimits
from shared.redis_state.streams import StreamEvent, StreamKind, read_last

T = TypeVar("T")
LIMITS = StreamLimits(max_entries=1_000, max_bytes=1_000_000, ttl=600)
OUTPUT, DONE = StreamKind.output, StreamKind.done
READER, WRITER = "hub-reader", "hub-writer"
# A block far longer than any bound asserted below: only a wake-up can explain a fast event.
LONG_BLOCK_MS = 10_000
WITHIN = 1.0  # s: how soon a subscriber added during a block gets its first event


@pytest.fixture
def run(r: redis.Redis, bare_redis: RedisServer) -> Callable[[Callable[[str], Awaitable[T]]], T]:
    """Runs `main(url)` on a fresh event loop, on an empty database (`r` flushed it)."""

    def runner(main: Callable[[str], Awaitable[T]]) -> T:
        return asyncio.run(asyncio.wait_for(main(bare_redis.url), 60))

    return runner


@asynccontextmanager
async def hub_on(url: str, **options: int) -> AsyncIterator[StreamHub]:
    """A started hub whose two clients are named, so CLIENT LIST can count its connections."""
    block_ms = options.get("block_ms", 2_000)
    reader = aioredis.Redis.from_url(
        url, decode_responses=True, client_name=READER, socket_timeout=block_ms / 1000 + 2
    )
    writer = aioredis.Redis.from_url(url, decode_responses=True, client_name=WRITER)
    try:
        async with StreamHub(reader, writer, **options) as hub:
            yield hub
    finally:
        await reader.aclose()
        await writer.aclose()


class Producer:
    """The worker's side: appends through the real script on a client of its own."""

    def __init__(self, url: str) -> None:
        self.client = aioredis.Redis.from_url(url, decode_responses=True)
        self.script = AppendToStream(self.client)

    async def __call__(self, task_id: str, kind: StreamKind, data: str, attempt: int = 1) -> str:
        appended = await self.script(task_id, kind, data, attempt=attempt, limits=LIMITS)
        return appended.ids[-1]

    async def close(self) -> None:
        await self.client.aclose()


async def hub_connections(r: aioredis.Redis) -> list[dict[str, str]]:
    return [c for c in await r.client_list() if c.get("name") in (READER, WRITER)]


async def until_blocked(r: aioredis.Redis) -> None:
    """Until the hub's reader sits in its blocking XREAD."""
    for _ in range(200):
        if any(c["name"] == READER and c["cmd"] == "xread" for c in await hub_connections(r)):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the hub never blocked")


async def drain(subscription: Subscription) -> list[StreamEvent]:
    return [event async for event in subscription]


def test_two_hundred_subscribers_on_two_hundred_tasks_share_two_connections(
    run: Callable[[Callable[[str], Awaitable[None]]], None],
) -> None:
    async def main(url: str) -> None:
        produce, observer = Producer(url), aioredis.Redis.from_url(url, decode_responses=True)
        tasks = [f"task-{n}" for n in range(200)]
        for task_id in tasks[::2]:  # half of them already streamed some: read as history
            for n in range(3):
                await produce(task_id, OUTPUT, f"{task_id}:{n}")
        async with hub_on(url) as hub:
            subscriptions = [hub.subscribe(task_id) for task_id in tasks]
            readers = [asyncio.create_task(drain(s)) for s in subscriptions]
            await asyncio.sleep(0.2)
            assert hub.streams == 200
            for task_id in tasks:
                start = 3 if task_id in tasks[::2] else 0
                for n in range(start, 5):
                    await produce(task_id, OUTPUT, f"{task_id}:{n}")
            during = await hub_connections(observer)
            for task_id in tasks:
                await produce(task_id, DONE, "{}")
            results = await asyncio.gather(*readers)
            assert len(during) <= 2
            assert len(await hub_connections(observer)) <= 2
            for task_id, events in zip(tasks, results, strict=True):
                assert [e.data for e in events] == [f"{task_id}:{n}" for n in range(5)] + ["{}"]
                assert events[-1].kind is DONE
            assert all(s.finished for s in subscriptions)
            assert hub.streams == 0  # each stream is dropped once its done is handed over
            assert hub.reads < 200 * 6  # one XREAD serves many streams at once
        await produce.close()
        await observer.aclose()

    run(main)


def test_a_subscriber_added_while_the_hub_blocks_is_served_within_the_bound(
    run: Callable[[Callable[[str], Awaitable[None]]], None],
) -> None:
    async def main(url: str) -> None:
        produce, observer = Producer(url), aioredis.Redis.from_url(url, decode_responses=True)
        await produce("old", OUTPUT, "history")
        async with hub_on(url, block_ms=LONG_BLOCK_MS) as hub:
            idle = hub.subscribe("idle")  # something to block on
            await until_blocked(observer)
            started = time.monotonic()
            late = hub.subscribe("old")  # its history is there already
            first = await asyncio.wait_for(late.next(), WITHIN)
            assert first.data == "history"
            assert time.monotonic() - started < WITHIN
            # A subscriber of a stream that does not exist yet gets its first chunk as soon.
            await until_blocked(observer)
            fresh = hub.subscribe("fresh")
            await until_blocked(observer)  # its wake-up came; now the hub blocks on it too
            started = time.monotonic()
            await produce("fresh", OUTPUT, "now")
            assert (await asyncio.wait_for(fresh.next(), WITHIN)).data == "now"
            assert time.monotonic() - started < WITHIN
            idle.close()
            closing = time.monotonic()
        assert time.monotonic() - closing < WITHIN  # closing does not wait out the block
        assert await observer.keys(HUB_WAKE_KEY_PREFIX + "*") == []  # closed: wake key gone
        await produce.close()
        await observer.aclose()

    run(main)


def test_a_late_reader_gets_the_whole_history_then_done(
    run: Callable[[Callable[[str], Awaitable[None]]], None],
) -> None:
    async def main(url: str) -> None:
        produce = Producer(url)
        ids = [await produce("t1", OUTPUT, str(n)) for n in range(250)]  # over COUNT
        ids.append(await produce("t1", DONE, '{"status": "succeeded"}'))
        async with hub_on(url, count=100) as hub:
            subscription = hub.subscribe("t1")
            events = await drain(subscription)
            assert [e.id for e in events] == ids
            assert [e.data for e in events[:-1]] == [str(n) for n in range(250)]
            assert events[-1].kind is DONE
            assert subscription.finished
            assert subscription.last_id == ids[-1]
            with pytest.raises(StopAsyncIteration):
                await subscription.next()
            # Resuming after any id gives exactly the rest: none twice, none missing.
            for position in (0, 99, 100, 249):
                rest = await drain(hub.subscribe("t1", ids[position]))
                assert [e.id for e in rest] == ids[position + 1 :]
            # A client back after the done itself (EventSource reconnects when a stream
            # closes) is told by the stream's last event, not left waiting on the hub.
            last = await read_last(produce.client, "t1")
            assert last is not None
            assert last.terminal
            assert last.id == ids[-1]
            assert hub.streams == 0
        await produce.close()

    run(main)


def test_readers_of_one_task_at_different_positions_each_get_their_rest(
    run: Callable[[Callable[[str], Awaitable[None]]], None],
) -> None:
    async def main(url: str) -> None:
        produce = Producer(url)
        ids = [await produce("t1", OUTPUT, str(n)) for n in range(10)]
        async with hub_on(url) as hub:
            behind, ahead = hub.subscribe("t1"), hub.subscribe("t1", ids[6])
            readers = [asyncio.create_task(drain(s)) for s in (behind, ahead)]
            await asyncio.sleep(0.1)
            for n in range(10, 15):
                ids.append(await produce("t1", OUTPUT, str(n)))
            ids.append(await produce("t1", DONE, "{}"))
            got_behind, got_ahead = await asyncio.gather(*readers)
            assert [e.id for e in got_behind] == ids
            assert [e.id for e in got_ahead] == ids[7:]
        await produce.close()

    run(main)


def test_a_slow_reader_is_paused_not_dropped_and_loses_nothing(
    run: Callable[[Callable[[str], Awaitable[None]]], None],
) -> None:
    async def main(url: str) -> None:
        produce = Producer(url)
        ids = [await produce("slow", OUTPUT, str(n)) for n in range(60)]
        ids.append(await produce("slow", DONE, "{}"))
        async with hub_on(url, buffer=4, count=10, block_ms=LONG_BLOCK_MS) as hub:
            slow = hub.subscribe("slow")
            await asyncio.sleep(0.1)
            assert slow.paused  # 4 buffered, the rest left in Redis
            got = []
            async for event in slow:
                got.append(event.id)
                await asyncio.sleep(0.005)
            assert got == ids
        await produce.close()

    run(main)


def test_unsubscribe_stops_delivery_and_drops_the_stream(
    run: Callable[[Callable[[str], Awaitable[None]]], None],
) -> None:
    async def main(url: str) -> None:
        produce = Producer(url)
        async with hub_on(url, block_ms=200) as hub:
            gone, stays = hub.subscribe("gone"), hub.subscribe("stays")
            await produce("gone", OUTPUT, "first")
            assert (await asyncio.wait_for(gone.next(), WITHIN)).data == "first"
            gone.close()
            assert hub.streams == 1
            for n in range(3):
                await produce("gone", OUTPUT, f"after {n}")
            await produce("stays", OUTPUT, "x")
            assert (await asyncio.wait_for(stays.next(), WITHIN)).data == "x"
            await asyncio.sleep(0.5)  # the hub went round again (block_ms=200): nothing for it
            assert hub.reads >= 2
            with pytest.raises(StopAsyncIteration):
                await gone.next()
            assert not gone.finished
            assert gone.last_id != "0-0"
        # A closed hub ends what is left (not finished: the client reconnects with last_id).
        with pytest.raises(StopAsyncIteration):
            await stays.next()
        assert not stays.finished
        with pytest.raises(RuntimeError):
            hub.subscribe("t")
        await produce.close()

    run(main)


def test_the_hub_refuses_a_reader_whose_socket_would_time_out_mid_block(
    bare_redis: RedisServer,
) -> None:
    short = aioredis.Redis.from_url(bare_redis.url, socket_timeout=1.5)
    with pytest.raises(ValueError, match="socket timeout"):
        StreamHub(short, short, block_ms=2_000)
    with pytest.raises(ValueError, match="buffer"):
        StreamHub(short, short, block_ms=100, buffer=1)
    StreamHub(short, short, block_ms=100)  # nothing started, nothing to close
    asyncio.run(short.aclose())
