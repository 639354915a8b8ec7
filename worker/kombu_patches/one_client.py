"""One redis-py client per kombu channel for its synchronous calls, instead of one per call.

Symptom. A worker's profile shows a share of its CPU per message spent building `redis.Redis`
objects (`Channel._create_client` under `conn_or_acquire`), more than the Redis commands they
then send cost.

Cause. Kombu's Redis transport (5.7) answers every QoS step of every message (the append to the
unacked index when a message is fetched, the ack, the reject) with `Channel.conn_or_acquire()`,
which builds a new `redis.Redis` around the channel's pool each time, and redis-py 8 fills a
response-callback table per client.

The fix: `Channel._create_client` keeps one synchronous client per channel. A `redis.Redis` is
thread-safe (each command takes a connection from the pool), so one serves all of the channel's
calls; it is rebuilt when the channel's pool changes (a reconnect makes a new pool). The
asynchronous client (BRPOP on the event loop) is kombu's own and unchanged. Closed channels are
still never used: the ack guard (acks.py) stops their acks before they reach a client.

Upstream. No kombu issue reports this (searched the tracker for per-call client creation in
`conn_or_acquire`); it is a candidate to report with the profile.

Remove when kombu's `conn_or_acquire` reuses a client (read `Channel.conn_or_acquire` and
`_create_client` in the new kombu), or when building a redis-py client is cheap again; the test
of this patch in tests/unit/worker/test_kombu_patches.py shows whether kombu already reuses one.
"""

from __future__ import annotations

import weakref
from typing import Any

from worker.kombu_patches.originals import original

# Where a channel keeps its synchronous client (in its instance dict, so it dies with it).
CLIENT_ATTR = "_dispatcher_sync_client"
# Every channel that built a client, while it lives: broker_primary.py reads their connections.
CHANNELS: weakref.WeakSet[Any] = weakref.WeakSet()


def create_client(self: Any, asynchronous: bool = False) -> Any:
    """`Channel._create_client`: the channel's one synchronous client, for its current pool."""
    create = original("Channel._create_client")
    CHANNELS.add(self)
    if asynchronous:
        return create(self, asynchronous=True)
    pool = self.pool
    client = self.__dict__.get(CLIENT_ATTR)
    if client is None or client.connection_pool is not pool:
        client = create(self, asynchronous=False)
        self.__dict__[CLIENT_ATTR] = client
    return client
