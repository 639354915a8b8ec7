"""worker/broker_speed.py against kombu's real Redis transport and a real redis-server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from kombu import Connection, Exchange, Queue

from devstack import RedisServer
from worker import broker_fixes, broker_speed

broker_fixes.install()
broker_speed.install()


@pytest.fixture
def queue_name(redis_server: RedisServer) -> Iterator[str]:
    if not redis_server.alive:
        redis_server.start()
    name = f"test-broker-speed-{uuid.uuid4().hex[:8]}"
    yield name
    redis_server.client().delete(name)


def test_a_channel_reuses_one_client_and_fetch_ack_still_work(
    redis_server: RedisServer, queue_name: str
) -> None:
    connection = Connection(redis_server.url)
    queue = Queue(queue_name, Exchange(queue_name, type="direct"), queue_name)
    try:
        with connection.Producer() as producer:
            for n in range(3):
                producer.publish(
                    {"n": n}, exchange=queue.exchange, routing_key=queue_name, declare=[queue]
                )
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
