"""Every client factory against a real Sentinel topology (tests/support/sentinel.py): the API's
pool and stream-hub reader, the result listener's subscription, the worker's engine client and
heartbeat, and a Celery app's broker connection reach the primary through the sentinels, with
TCP keepalive on their sockets, and after `SENTINEL FAILOVER` they write to the new primary."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from kombu import Connection, Queue

from api.main import hub_reader, redis_client
from api.waiting import ResultWaiter
from shared.celery_app import PUBLISH_RETRY_POLICY, create_celery_app
from shared.redis_connect import SENTINEL_TIMEOUT, follow_primary
from shared.redis_state.keys import FINISHED_CHANNEL
from shared.settings import Settings
from tests.support.sentinel import Node, SentinelTopology
from worker import heartbeat
from worker.store import connect as worker_connect

# Writes reach the new primary within this after a manual failover: Redis 6.2's sentinels turn
# the live old primary into a replica up to ~10 s later, and a client moves when it is refused.
MOVE_BOUND = 40.0


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    with SentinelTopology(tmp_path_factory.mktemp("sentinel")) as topology:
        yield topology


@pytest.fixture
def settings(topology: SentinelTopology, clean_env: None) -> Settings:
    topology.settle()
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=topology.url,
        redis_sentinel_master=topology.master,
    )


def _has(node: Node, key: str) -> bool:
    with node.client() as client:
        return bool(client.exists(key))


def _keepalive(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)


async def _async_socket(client: aioredis.Redis) -> socket.socket:
    connection = await client.connection_pool.get_connection()
    try:
        await connection.connect()
        sock: socket.socket = connection._writer.get_extra_info("socket")
        return sock
    finally:
        await client.connection_pool.release(connection)


def _publish(connection: Connection, queue: str, body: dict[str, Any]) -> None:
    with connection.Producer(serializer="json") as producer:
        producer.publish(
            body, routing_key=queue, declare=[Queue(queue)], retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )  # fmt: skip


def test_every_client_reaches_the_primary_through_the_sentinels(
    topology: SentinelTopology, settings: Settings
) -> None:
    primary = topology.primary()
    mark = uuid.uuid4().hex

    async def async_side() -> None:
        api, hub, engine = redis_client(settings), hub_reader(settings), worker_connect(settings)
        waiter = ResultWaiter(api)
        try:
            for name, client in (("api", api), ("hub", hub), ("engine", engine)):
                await client.set(f"reach:{name}:{mark}", 1)
                assert _has(primary, f"reach:{name}:{mark}"), name
                assert _keepalive(await _async_socket(client)) == 1, name
            await waiter.start()
            await asyncio.wait_for(waiter.subscribed.wait(), 10)
            with primary.client() as direct:  # the result listener subscribed on the primary
                assert dict(direct.pubsub_numsub(FINISHED_CHANNEL))[FINISHED_CHANNEL] >= 1
        finally:
            await waiter.stop()
            for client in (api, hub, engine):
                await client.aclose()

    asyncio.run(async_side())
    beat = heartbeat.connect(settings)
    try:
        beat.set(f"reach:beat:{mark}", 1)
        assert _has(primary, f"reach:beat:{mark}")
        connection = beat.connection_pool.get_connection()
        try:
            assert _keepalive(connection._sock) == 1
        finally:
            beat.connection_pool.release(connection)
    finally:
        beat.close()
    app = create_celery_app(settings)
    queue = f"reach-{mark}"
    with app.connection_for_write() as connection:
        assert connection.transport_cls == "sentinel"
        _publish(connection, queue, {"n": 1})
        with primary.client() as direct:
            assert direct.llen(queue) == 1
        pool = connection.default_channel.client.connection_pool
        broker_connection = pool.get_connection()
        try:
            assert _keepalive(broker_connection._sock) == 1
        finally:
            pool.release(broker_connection)


def test_after_a_manual_failover_every_client_writes_to_the_new_primary(
    topology: SentinelTopology, settings: Settings
) -> None:
    mark = uuid.uuid4().hex
    api = redis_client(settings)
    hub = hub_reader(settings)
    engine = worker_connect(settings)
    beat = heartbeat.connect(settings)
    app = create_celery_app(settings)
    broker = app.connection_for_write()
    loop = asyncio.new_event_loop()
    try:
        for client in (api, hub, engine):  # every client holds a connection to the old primary
            loop.run_until_complete(client.set(f"before:{mark}", 1))
        beat.set(f"before:{mark}", 1)
        _publish(broker, f"before-{mark}", {"n": 0})
        old = topology.primary()
        new = topology.failover()
        assert new is not old
        # The API follows the sentinels by itself (its replica check asks them every second):
        # its next write goes to the new primary at once, while the old one still takes writes.
        assert loop.run_until_complete(follow_primary(api))
        loop.run_until_complete(api.set(f"followed:{mark}", 1))
        assert _has(new, f"followed:{mark}")
        assert not _has(old, f"followed:{mark}")

        def on_loop(write: Callable[[str], Awaitable[object]]) -> Callable[[str], object]:
            return lambda key: loop.run_until_complete(write(key))

        writes: dict[str, Callable[[str], object]] = {
            "hub": on_loop(lambda key: hub.set(key, 1)),
            "engine": on_loop(lambda key: engine.set(key, 1)),
            "heartbeat": lambda key: beat.set(key, 1),
            "broker": lambda key: _publish(broker, key, {"n": 1}),
        }
        reached: dict[str, float] = {}
        started = time.monotonic()
        attempt = 0
        while len(reached) < len(writes) and time.monotonic() - started < MOVE_BOUND:
            attempt += 1
            for name, write in writes.items():
                if name in reached:
                    continue
                key = f"moved-{name}-{mark}-{attempt}"
                try:
                    write(key)
                except redis.RedisError:
                    continue  # refused by the demoted node: the next attempt reconnects
                if _has(new, key):
                    reached[name] = time.monotonic() - started
            time.sleep(0.2)
        assert set(reached) == set(writes), f"still on the old primary after {MOVE_BOUND} s"
    finally:
        broker.release()
        beat.close()
        for client in (api, hub, engine):
            loop.run_until_complete(client.aclose())
        loop.close()


def test_a_dead_or_frozen_sentinel_changes_nothing(
    topology: SentinelTopology, settings: Settings
) -> None:
    """A fresh client asks the sentinels in order: a dead one refuses at once, a frozen one
    costs one SENTINEL_TIMEOUT (no retries of its own), then the next one answers."""
    first = topology.sentinels[0]
    primary = topology.primary()
    for fault, undo in ((first.kill, first.start), (first.freeze, first.thaw)):
        fault()
        try:
            started = time.monotonic()
            with heartbeat.connect(settings) as client:
                client.set(f"after-{fault.__name__}", 1)
            assert time.monotonic() - started < 3 * SENTINEL_TIMEOUT
            assert _has(primary, f"after-{fault.__name__}")
        finally:
            undo()
