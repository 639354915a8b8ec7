"""worker/broker_fixes.py against kombu's real Redis transport and a real redis-server.

Each test first shows what the unguarded kombu code does (the bug), then what the guard does, so a
kombu upgrade that fixes or changes the behaviour shows up here.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue
from kombu.message import Message
from kombu.transport import redis as kombu_redis

from devstack import RedisServer
from worker import broker_fixes

broker_fixes.install()


@pytest.fixture
def queue_name(redis_server: RedisServer) -> Iterator[str]:
    if not redis_server.alive:
        redis_server.start()
    name = f"test-broker-fixes-{uuid.uuid4().hex[:8]}"
    yield name
    redis_server.client().delete(name)


def _publish_and_fetch(url: str, name: str) -> tuple[Connection, Any, Message]:
    """One message published, then fetched (unacked) on a fresh connection's channel."""
    connection = Connection(url)
    queue = Queue(name, Exchange(name, type="direct"), name)
    with connection.Producer() as producer:
        producer.publish({"n": 1}, exchange=queue.exchange, routing_key=name, declare=[queue])
    channel = connection.channel()
    message = queue(channel).get(no_ack=False)
    assert message is not None
    return connection, channel, message


def _unacked(redis_server: RedisServer, tag: str) -> bool:
    client = redis_server.client()
    return bool(client.hexists("unacked", tag)) and client.zscore("unacked_index", tag) is not None


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
    queue = Queue(queue_name, Exchange(queue_name, type="direct"), queue_name)
    copy = queue(new.channel()).get(no_ack=False)
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

    with caplog.at_level(logging.WARNING, logger="worker.broker_fixes"):
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
    with caplog.at_level(logging.CRITICAL, logger="worker.broker_fixes"):
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
