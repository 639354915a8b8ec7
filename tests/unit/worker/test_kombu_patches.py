"""worker/kombu_patches against kombu's real Redis transport and a real redis-server.

Where a patch fixes a bug, its test first shows what the unpatched kombu code does (through the
replacement's `__wrapped__`, kombu's own function), then what the patch does, so a kombu upgrade
that fixes or changes the behaviour shows up here.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from celery.worker import state as worker_state
from kombu import Connection
from kombu.transport import redis as kombu_redis
from kombu.utils.scheduling import cycle_by_name

from devstack import RedisServer
from shared.celery_app import create_celery_app
from shared.priorities import ALL_QUEUES, LOWER_FIRST_EVERY
from shared.settings import Settings
from tests.unit.worker.kombu_support import publish, publish_and_fetch, queue_of, unacked
from worker import kombu_patches
from worker.kombu_patches import PATCHES, InteractiveFirst, renew_leases
from worker.kombu_patches.originals import ORIGINALS

kombu_patches.install()

GUARD_LOG = "worker.kombu_patches.closed_channel"
INTERACTIVE, DEFAULT, BATCH = ALL_QUEUES


@pytest.fixture
def queue_name(redis_server: RedisServer) -> Iterator[str]:
    if not redis_server.alive:
        redis_server.start()
    name = f"test-kombu-patches-{uuid.uuid4().hex[:8]}"
    yield name
    redis_server.client().delete(name)


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
    old, _, message = publish_and_fetch(redis_server.url, queue_name)
    # What Celery does when the broker connection is lost: collect it. Closing the channel
    # restores the unacked message to the queue, with the same delivery tag.
    old.collect()
    assert redis_server.client().llen(queue_name) == 1

    # Another consumer (or this worker after reconnecting) takes the restored copy.
    new = Connection(redis_server.url)
    copy = queue_of(queue_name)(new.channel()).get(no_ack=False)
    assert copy is not None
    assert copy.delivery_tag == message.delivery_tag
    assert unacked(redis_server, copy.delivery_tag)

    # The task of the first delivery ends now and its ack runs on the old channel: it must not
    # delete the unacked entry of the copy (then lost if the copy's worker died).
    message.ack()
    assert unacked(redis_server, copy.delivery_tag)
    copy.ack()
    assert not unacked(redis_server, copy.delivery_tag)
    new.release()


def test_ack_on_a_channel_whose_pool_and_client_are_gone_does_not_raise(
    redis_server: RedisServer, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    old, channel, message = publish_and_fetch(redis_server.url, queue_name)
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
    connection, channel, message = publish_and_fetch(redis_server.url, queue_name)

    def broken(delivery_tag: str, multiple: bool = False) -> None:
        raise RuntimeError("an ack path nobody foresaw")

    channel.basic_ack = broken
    with caplog.at_level(logging.CRITICAL, logger=GUARD_LOG):
        message.ack_log_error(logging.getLogger("test"), connection.connection_errors)
    assert "the worker keeps running" in caplog.text
    assert "an ack path nobody foresaw" in caplog.text
    connection.release()


def test_connection_errors_still_reach_celery(redis_server: RedisServer, queue_name: str) -> None:
    connection, channel, message = publish_and_fetch(redis_server.url, queue_name)

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
    queue = queue_of(queue_name)
    try:
        publish(connection, queue_name, count=3)
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


# Lease renewal in kombu's unacked index.


def test_renewal_rescores_held_messages_and_never_re_adds_acked_ones(
    redis_server: RedisServer, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection, _, message = publish_and_fetch(redis_server.url, queue_name)
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
