"""worker/kombu_patches against kombu's real Redis transport and a real redis-server.

Where a patch fixes a bug, its test first shows what the unpatched kombu code does (through the
replacement's `__wrapped__`, kombu's own function), then what the patch does, so a kombu upgrade
that fixes or changes the behaviour shows up here.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.worker import state as worker_state
from kombu import Connection, Exchange, Queue
from kombu.message import Message
from kombu.transport import redis as kombu_redis
from kombu.utils.scheduling import cycle_by_name
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError

from devstack import RedisServer, free_port, wait_until
from shared.celery_app import create_celery_app
from shared.priorities import ALL_QUEUES, LOWER_FIRST_EVERY
from shared.settings import Settings
from worker import kombu_patches
from worker.kombu_patches import PATCHES, InteractiveFirst, refusals, renew_leases
from worker.kombu_patches.originals import ORIGINALS

kombu_patches.install()

GUARD_LOG = "worker.kombu_patches.closed_channel"
REFUSALS_LOG = "worker.kombu_patches.refusals"
INTERACTIVE, DEFAULT, BATCH = ALL_QUEUES


@pytest.fixture
def queue_name(redis_server: RedisServer) -> Iterator[str]:
    if not redis_server.alive:
        redis_server.start()
    name = f"test-kombu-patches-{uuid.uuid4().hex[:8]}"
    yield name
    redis_server.client().delete(name)


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), name)


def _publish(connection: Connection, name: str, count: int = 1) -> None:
    queue = _queue(name)
    with connection.Producer() as producer:
        for n in range(count):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key=name, declare=[queue])


def _publish_and_fetch(url: str, name: str) -> tuple[Connection, Any, Message]:
    """One message published, then fetched (unacked) on a fresh connection's channel."""
    connection = Connection(url)
    _publish(connection, name)
    channel = connection.channel()
    message = _queue(name)(channel).get(no_ack=False)
    assert message is not None
    return connection, channel, message


def _unacked(server: RedisServer, tag: str) -> bool:
    client = server.client()
    return bool(client.hexists("unacked", tag)) and client.zscore("unacked_index", tag) is not None


# install(): one order, once.


def test_install_is_idempotent_and_applies_the_documented_order() -> None:
    kombu_patches.install()
    kombu_patches.install()
    # Each attribute is replaced once, by its one replacement, wrapping kombu's own function.
    for patch in PATCHES:
        current = getattr(patch.owner, patch.name)
        assert current is patch.replacement, patch.target
        assert current.__wrapped__ is ORIGINALS[patch.target], patch.target  # type: ignore[attr-defined]
        assert ORIGINALS[patch.target].__module__.startswith("kombu."), patch.target
    # The order applied is the docstring's list, and each item names the module doing it.
    assert kombu_patches.__doc__ is not None
    items = re.findall(r"^\d+\. (.+?) \((\w+)\.py\)", kombu_patches.__doc__, re.MULTILINE)
    documented = [name for names, _ in items for name in re.findall(r"`(\w+\.\w+)`", names)]
    assert kombu_patches.installed() == tuple(documented)
    assert kombu_patches.installed() == tuple(patch.target for patch in PATCHES)
    modules = {name: module for names, module in items for name in re.findall(r"`(\S+)`", names)}
    for patch in PATCHES:
        assert patch.replacement.__module__ == f"worker.kombu_patches.{modules[patch.target]}"


# The closed-channel guard and the ack/reject log guards.


def test_late_ack_on_a_collected_connection_never_touches_the_redelivered_copy(
    redis_server: RedisServer, queue_name: str
) -> None:
    old, _, message = _publish_and_fetch(redis_server.url, queue_name)
    # What Celery does when the broker connection is lost: collect it. Closing the channel
    # restores the unacked message to the queue, with the same delivery tag.
    old.collect()
    assert redis_server.client().llen(queue_name) == 1

    # Another consumer (or this worker after reconnecting) takes the restored copy.
    new = Connection(redis_server.url)
    copy = _queue(queue_name)(new.channel()).get(no_ack=False)
    assert copy is not None
    assert copy.delivery_tag == message.delivery_tag
    assert _unacked(redis_server, copy.delivery_tag)

    # The task of the first delivery ends now and its ack runs on the old channel: it must not
    # delete the unacked entry of the copy (then lost if the copy's worker died).
    message.ack()
    assert _unacked(redis_server, copy.delivery_tag)
    copy.ack()
    assert not _unacked(redis_server, copy.delivery_tag)
    new.release()


def test_ack_on_a_channel_whose_pool_and_client_are_gone_does_not_raise(
    redis_server: RedisServer, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    old, channel, message = _publish_and_fetch(redis_server.url, queue_name)
    # The state of the crash: a channel whose close got as far as dropping its pools (the first
    # thing Channel.close() does) on a connection that Celery then collected, which drops the
    # transport's client. Any Redis call on it rebuilds the pool from `transport.client`.
    channel._disconnect_pools()
    old._do_close_transport()
    unguarded = kombu_redis.QoS.ack.__wrapped__  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="hostname"):
        unguarded(channel.qos, message.delivery_tag)

    with caplog.at_level(logging.WARNING, logger=GUARD_LOG):
        message.ack_log_error(logging.getLogger("test"), old.connection_errors)
    assert "its broker connection was closed" in caplog.text
    # Its restore-at-exit finalizer would try the same dead transport when the process ends.
    channel.qos._on_collect.cancel()


def test_an_unexpected_ack_error_is_logged_not_raised(
    redis_server: RedisServer, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    connection, channel, message = _publish_and_fetch(redis_server.url, queue_name)

    def broken(delivery_tag: str, multiple: bool = False) -> None:
        raise RuntimeError("an ack path nobody foresaw")

    channel.basic_ack = broken
    with caplog.at_level(logging.CRITICAL, logger=GUARD_LOG):
        message.ack_log_error(logging.getLogger("test"), connection.connection_errors)
    assert "the worker keeps running" in caplog.text
    assert "an ack path nobody foresaw" in caplog.text
    connection.release()


def test_connection_errors_still_reach_celery(redis_server: RedisServer, queue_name: str) -> None:
    connection, channel, message = _publish_and_fetch(redis_server.url, queue_name)

    def broken_pipe(delivery_tag: str, multiple: bool = False) -> None:
        raise BrokenPipeError("socket gone")

    channel.basic_ack = broken_pipe
    with pytest.raises(BrokenPipeError):  # Celery reconnects on it, as without the guard
        message.ack_log_error(logging.getLogger("test"), connection.connection_errors)
    connection.release()


# One client per channel.


def test_a_channel_reuses_one_client_and_fetch_ack_still_work(
    redis_server: RedisServer, queue_name: str
) -> None:
    connection = Connection(redis_server.url)
    queue = _queue(queue_name)
    try:
        _publish(connection, queue_name, count=3)
        channel = connection.channel()
        first = channel._create_client()
        assert channel._create_client() is first  # one client for every QoS call
        assert channel._create_client(asynchronous=True) is not first  # BRPOP's stays kombu's
        for n in range(3):  # fetch (QoS append) and ack through the shared client
            message = queue(channel).get(no_ack=False)
            assert message is not None
            assert message.payload == {"n": n}
            tag = message.delivery_tag
            assert redis_server.client().hexists("unacked", tag)
            message.ack()
            assert not redis_server.client().hexists("unacked", tag)
        # A new pool (what a reconnect builds) gets a new client around it.
        channel._pool = None
        assert channel._create_client() is not first
        assert channel._create_client().connection_pool is channel.pool
    finally:
        connection.release()


# A Redis that refuses writes (a private server: these tests make it refuse).


@contextmanager
def out_of_memory(client: redis.Redis) -> Iterator[None]:
    """maxmemory far below what Redis uses, policy noeviction: writes that may grow are refused."""
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    try:
        yield
    finally:
        client.config_set("maxmemory", 0)


@contextmanager
def read_only_replica(client: redis.Redis) -> Iterator[None]:
    """A replica of a primary that never answers: read-only, its data kept (no sync happens)."""
    client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
    try:
        yield
    finally:
        client.execute_command("REPLICAOF", "NO", "ONE")


@pytest.fixture
def quiet_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    # The once-a-minute warnings start afresh for each test.
    monkeypatch.setattr(refusals, "_warned_at", {})


def test_a_fetched_message_waits_until_redis_holds_it_in_the_unacked_set(
    dedicated_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = dedicated_redis.client()
    connection = Connection(dedicated_redis.url)
    _publish(connection, "refused-append")
    channel = connection.channel()
    fetched: list[Message] = []
    with caplog.at_level(logging.WARNING, logger=REFUSALS_LOG), out_of_memory(client):
        # Unpatched, the refused append raises after the message has left the queue: lost.
        fetcher = threading.Thread(
            target=lambda: fetched.append(_queue("refused-append")(channel).get(no_ack=False))
        )
        fetcher.start()
        wait_until(lambda: "holding the message of task" in caplog.text, 5, "append waits")
        assert client.llen("refused-append") == 0  # popped, not yet held: only this process has it
        assert fetcher.is_alive()
    fetcher.join(timeout=5)
    assert not fetcher.is_alive()
    assert _unacked(dedicated_redis, fetched[0].delivery_tag)
    assert "Redis accepts writes again" in caplog.text
    fetched[0].ack()
    connection.release()


def test_a_refused_ack_leaves_the_message_unacked_for_redelivery(
    dedicated_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = dedicated_redis.client()
    connection, channel, message = _publish_and_fetch(dedicated_redis.url, "refused-ack")
    tag = message.delivery_tag
    channel.qos.prefetch_count = 1
    assert not channel.qos.can_consume()  # the message holds the one prefetch slot
    unpatched = kombu_redis.QoS.ack.__wrapped__  # type: ignore[attr-defined]
    with out_of_memory(client):
        with pytest.raises(OutOfMemoryError):  # what ends the worker, unpatched
            unpatched(channel.qos, tag)
        with caplog.at_level(logging.WARNING, logger=REFUSALS_LOG):
            message.ack()
    assert "not acknowledged: Redis refuses writes" in caplog.text
    assert _unacked(dedicated_redis, tag)  # comes back after the visibility timeout
    assert channel.qos.can_consume()  # forgotten here only: the prefetch slot is free again
    connection.release()


def test_a_refused_restore_leaves_held_messages_unacked(
    dedicated_redis: RedisServer, caplog: pytest.LogCaptureFixture, quiet_warnings: None
) -> None:
    client = dedicated_redis.client()
    connection, channel, message = _publish_and_fetch(dedicated_redis.url, "refused-restore")
    with out_of_memory(client), caplog.at_level(logging.WARNING, logger=REFUSALS_LOG):
        channel.qos.restore_visible()  # the sweep's mutex is a write: refused, tried again later
        channel.qos.restore_unacked()  # a closing channel cannot put its message back now
    assert "unacked messages not restored now: Redis refuses writes" in caplog.text
    assert "held messages left unacked: Redis refuses writes" in caplog.text
    assert _unacked(dedicated_redis, message.delivery_tag)
    assert client.llen("refused-restore") == 0
    assert not channel.qos._delivered
    connection.release()


def test_a_refused_brpop_pauses_and_reads_as_an_empty_poll(
    dedicated_redis: RedisServer, caplog: pytest.LogCaptureFixture, quiet_warnings: None
) -> None:
    connection = Connection(dedicated_redis.url)
    channel = connection.channel()
    channel._active_queues.append("refused-brpop")
    channel._update_queue_cycle()
    # What the event loop's poller does before the first BRPOP of a channel.
    channel.client.connection = channel.client.connection_pool.get_connection()
    unpatched = kombu_redis.Channel._brpop_read.__wrapped__  # type: ignore[attr-defined]
    with read_only_replica(dedicated_redis.client()):
        channel._brpop_start(timeout=1)
        with pytest.raises(ReadOnlyError):  # out of the hub, unpatched
            unpatched(channel)
        channel._brpop_start(timeout=1)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger=REFUSALS_LOG), pytest.raises(Empty):
            channel._brpop_read()
        assert time.monotonic() - started >= refusals.MAX_PAUSE  # no hot loop of refused BRPOPs
    assert "not fetching tasks: Redis refuses writes" in caplog.text
    connection.release()


def test_a_brpop_blocked_while_its_server_becomes_a_replica_reads_as_an_empty_poll(
    dedicated_redis: RedisServer, caplog: pytest.LogCaptureFixture, quiet_warnings: None
) -> None:
    connection = Connection(dedicated_redis.url)
    channel = connection.channel()
    channel._active_queues.append("unblocked-brpop")
    channel._update_queue_cycle()
    channel.client.connection = channel.client.connection_pool.get_connection()
    unpatched = kombu_redis.Channel._brpop_read.__wrapped__  # type: ignore[attr-defined]
    client = dedicated_redis.client()
    channel._brpop_start(timeout=5)  # blocked: the queue is empty
    time.sleep(0.1)
    with read_only_replica(client), pytest.raises(ResponseError, match=r"^UNBLOCKED"):
        unpatched(channel)  # out of the hub, unpatched
    # Redis closes a client it unblocked so: kombu reconnects on the next BRPOP's ConnectionError.
    channel.client.connection = channel.client.connection_pool.get_connection()
    channel._brpop_start(timeout=5)
    time.sleep(0.1)
    with read_only_replica(client), caplog.at_level(logging.WARNING, logger=REFUSALS_LOG):
        with pytest.raises(Empty):
            channel._brpop_read()
        # Its connection was replaced: the next BRPOP is refused (READONLY), not a lost connection.
        channel._brpop_start(timeout=1)
        with pytest.raises(Empty):
            channel._brpop_read()
    assert "not fetching tasks: Redis refuses writes: it is a read-only replica" in caplog.text
    connection.release()


def test_a_record_write_waits_for_redis_and_gives_up_only_at_shutdown(
    dedicated_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = dedicated_redis.client()
    with out_of_memory(client):
        threading.Timer(0.5, lambda: client.config_set("maxmemory", 0)).start()
        written = refusals.retry_while_refused(lambda: client.set("record", "1"), "a record")
    assert written is True
    assert client.get("record") == b"1"
    monkeypatch.setattr(worker_state, "should_stop", 0)  # a warm shutdown (exit code 0)
    with out_of_memory(client), pytest.raises(OutOfMemoryError):
        refusals.retry_while_refused(lambda: client.set("record", "2"), "a record")


# Lease renewal in kombu's unacked index.


def test_renewal_rescores_held_messages_and_never_re_adds_acked_ones(
    redis_server: RedisServer, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection, _, message = _publish_and_fetch(redis_server.url, queue_name)
    client = redis_server.client()
    tag = message.delivery_tag
    client.zadd(kombu_redis.Channel.unacked_index_key, {tag: 1.0})  # delivered long ago
    acked = f"acked-{uuid.uuid4().hex}"
    held = {
        "running": SimpleNamespace(message=SimpleNamespace(delivery_tag=tag)),
        "done": SimpleNamespace(message=SimpleNamespace(delivery_tag=acked)),
    }
    monkeypatch.setattr(worker_state, "requests", held)
    before = time.time()
    renew_leases(client)
    assert (client.zscore("unacked_index", tag) or 0) >= before
    assert client.zscore("unacked_index", acked) is None
    message.ack()
    connection.release()


# The queue cycle, as kombu drives it.


def test_interactive_first_whatever_order_the_queues_were_given_in() -> None:
    cycle = InteractiveFirst()
    cycle.update([BATCH, "other", DEFAULT, INTERACTIVE])
    assert cycle.consume(4) == [INTERACTIVE, DEFAULT, BATCH, "other"]


def test_every_nth_fetch_names_the_lower_classes_first() -> None:
    """Under a flood of interactive work, batch still gets one fetch in LOWER_FIRST_EVERY."""
    cycle = InteractiveFirst()
    cycle.update(list(ALL_QUEUES))
    firsts = []
    for _ in range(4 * LOWER_FIRST_EVERY):
        order = cycle.consume(3)
        firsts.append(order[0])
        cycle.rotate(order[0])  # BRPOP popped from the first list named (all non-empty)
    assert firsts.count(BATCH) == 4
    assert firsts.count(INTERACTIVE) == 4 * (LOWER_FIRST_EVERY - 1)
    # Polls that pop nothing (empty queues, a BRPOP timeout) do not advance the rotation.
    cycle = InteractiveFirst()
    cycle.update(list(ALL_QUEUES))
    assert {cycle.consume(3)[0] for _ in range(10)} == {INTERACTIVE}


def test_the_celery_app_uses_it_and_fetches_only_into_free_slots(
    redis_server: RedisServer, queue_name: str
) -> None:
    app = create_celery_app(Settings(_env_file=None, redis_url=redis_server.url))  # type: ignore[call-arg]
    strategy = app.conf.broker_transport_options["queue_order_strategy"]
    assert cycle_by_name(strategy) is InteractiveFirst
    assert app.conf.worker_disable_prefetch is True
    assert app.conf.worker_prefetch_multiplier == 1
    # A worker's channel builds its cycle from that option.
    with app.connection_for_read() as connection:
        assert isinstance(connection.default_channel._queue_cycle, InteractiveFirst)
