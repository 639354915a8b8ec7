"""What the kombu patch tests share: a queue, a publish, a fetch that leaves a message unacked."""

from __future__ import annotations

from typing import Any

from kombu import Connection, Exchange, Queue
from kombu.message import Message

from devstack import RedisServer


def queue_of(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), name)


def publish(connection: Connection, name: str, count: int = 1) -> None:
    queue = queue_of(name)
    with connection.Producer() as producer:
        for n in range(count):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key=name, declare=[queue])


def publish_and_fetch(url: str, name: str) -> tuple[Connection, Any, Message]:
    """One message published, then fetched (unacked) on a fresh connection's channel."""
    connection = Connection(url)
    publish(connection, name)
    channel = connection.channel()
    message = queue_of(name)(channel).get(no_ack=False)
    assert message is not None
    return connection, channel, message


def unacked(server: RedisServer, tag: str) -> bool:
    client = server.client()
    return bool(client.hexists("unacked", tag)) and client.zscore("unacked_index", tag) is not None
