"""worker/kombu_patches/refusals.py against kombu's real Redis transport and a private
redis-server made to refuse writes (out of memory, or turned into a read-only replica).

As in test_kombu_patches.py, each test first shows what the unpatched kombu code does (the
replacement's `__wrapped__`), then what the patch does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty

import pytest
import redis
from celery.worker import state as worker_state
from kombu import Connection
from kombu.message import Message
from kombu.transport import redis as kombu_redis
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError

from devstack import RedisServer, free_port, wait_until
from tests.unit.worker.kombu_support import publish, publish_and_fetch, queue_of, unacked
from worker import kombu_patches
from worker.kombu_patches import refusals

kombu_patches.install()

REFUSALS_LOG = "worker.kombu_patches.refusals"


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
    publish(connection, "refused-append")
    channel = connection.channel()
    fetched: list[Message] = []
    with caplog.at_level(logging.WARNING, logger=REFUSALS_LOG), out_of_memory(client):
        # Unpatched, the refused append raises after the message has left the queue: lost.
        fetcher = threading.Thread(
            target=lambda: fetched.append(queue_of("refused-append")(channel).get(no_ack=False))
        )
        fetcher.start()
        wait_until(lambda: "holding the message of task" in caplog.text, 5, "append waits")
        assert client.llen("refused-append") == 0  # popped, not yet held: only this process has it
        assert fetcher.is_alive()
    fetcher.join(timeout=5)
    assert not fetcher.is_alive()
    assert unacked(dedicated_redis, fetched[0].delivery_tag)
    assert "Redis accepts writes again" in caplog.text
    fetched[0].ack()
    connection.release()


def test_a_refused_ack_leaves_the_message_unacked_for_redelivery(
    dedicated_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = dedicated_redis.client()
    connection, channel, message = publish_and_fetch(dedicated_redis.url, "refused-ack")
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
    assert unacked(dedicated_redis, tag)  # comes back after the visibility timeout
    assert channel.qos.can_consume()  # forgotten here only: the prefetch slot is free again
    connection.release()


def test_a_refused_restore_leaves_held_messages_unacked(
    dedicated_redis: RedisServer, caplog: pytest.LogCaptureFixture, quiet_warnings: None
) -> None:
    client = dedicated_redis.client()
    connection, channel, message = publish_and_fetch(dedicated_redis.url, "refused-restore")
    with out_of_memory(client), caplog.at_level(logging.WARNING, logger=REFUSALS_LOG):
        channel.qos.restore_visible()  # the sweep's mutex is a write: refused, tried again later
        channel.qos.restore_unacked()  # a closing channel cannot put its message back now
    assert "unacked messages not restored now: Redis refuses writes" in caplog.text
    assert "held messages left unacked: Redis refuses writes" in caplog.text
    assert unacked(dedicated_redis, message.delivery_tag)
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
