"""One redis-py client per kombu channel for its synchronous calls, instead of one per call.

Kombu's Redis transport (5.7) answers every QoS step of every message (the append to the unacked
index when a message is fetched, the ack, the reject, the lease renewal) with
`Channel.conn_or_acquire()`, which builds a new `redis.Redis` around the channel's pool each time.
Building one costs more than the Redis command it then sends (redis-py 8 fills a response-callback
table per client): about a tenth of a worker's CPU per message in the issue 12 profile. A
`redis.Redis` is thread-safe (each command takes a connection from the pool), so one per channel
serves them all; it is rebuilt when the channel's pool changes (a reconnect makes a new pool).
The asynchronous client (BRPOP on the event loop) is kombu's own and unchanged. Closed channels
are still never used: worker/broker_fixes.py guards acks before they reach the client.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis

_INSTALLED = "_dispatcher_one_client"
_CLIENT = "_dispatcher_sync_client"


def install() -> None:
    """Patch `Channel._create_client` once per process (worker/app.py calls it at import)."""
    channel = kombu_redis.Channel
    if getattr(channel, _INSTALLED, False):
        return
    create: Any = channel._create_client

    def _create_client(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous:
            return create(self, asynchronous=True)
        pool = self.pool
        client = self.__dict__.get(_CLIENT)
        if client is None or client.connection_pool is not pool:
            client = create(self, asynchronous=False)
            self.__dict__[_CLIENT] = client
        return client

    setattr(channel, "_create_client", _create_client)  # noqa: B010 - a patch, by name
    setattr(channel, _INSTALLED, True)
