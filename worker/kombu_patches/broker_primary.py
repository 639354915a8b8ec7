"""Kombu's broker connections leave an old primary as soon as the sentinels name a new one.

Not a patch of kombu's code: a thread that reads which nodes kombu's channels are connected to
(their redis-py clients, kombu-private attributes) and ends the connections on the wrong one.

Symptom. tests/reliability/test_sentinel_failover.py, SIGSTOP of the primary for 5 s: the
sentinels promote a replica after ~1 s and the API and the engine move at once
(shared/primary_watch.py), but both workers start no task for 15 s after the fault. The
worker's log says `the Redis primary moved` at once and `consumer: Connection to broker lost`
only 12 s later.

Cause. Kombu's sentinel transport asks the sentinels for the primary only when it connects. Its
BRPOP connection to a primary that is frozen, or left alive by a manual failover, stays open:
the thawed node answers each BRPOP (empty: the submits go to the new primary) until the
sentinels turn it into a replica, up to ~10 s later on Redis 6.2 (their INFO period). Only then
is the connection dropped and kombu reconnects through the sentinels.

Upstream. Kombu's sentinel transport does not follow `+switch-master` or re-ask the sentinels
on a live connection (kombu.transport.redis.SentinelChannel builds a pool once per channel).

The fix. Each channel is known once kombu builds its clients (one_client.py's CHANNELS). A
thread started when the worker is ready asks the sentinels once a second and, when a known
channel's connection is on another node, shuts its socket down (not closed: kombu's
event loop still polls the descriptor and must see it end). Kombu then reads an end of file,
raises a connection error, and Celery reconnects through the sentinels, as after a lost
connection; unacked messages stay in Redis (the new primary has them) and are redelivered or
renewed as usual. On a plain REDIS_URL nothing starts.

Remove when kombu's sentinel transport follows a switch on its open connections (look for
`switch-master` in kombu/transport/redis.py), and keep test_sentinel_failover.py's "workers
resume" figure for the frozen primary under a few seconds.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown

from shared.redis_connect import sync_client
from shared.redis_url import is_sentinel_url
from shared.settings import get_settings
from worker.kombu_patches.one_client import CHANNELS, CLIENT_ATTR

log = logging.getLogger(__name__)

# How often the sentinels are asked (the added delay before a worker consumes again).
FOLLOW_SECONDS = 1.0
_stop = threading.Event()


def connections(channel: Any) -> Iterator[Any]:
    """The redis-py connections of `channel` to end: BRPOP's (kombu's asynchronous client, one
    connection) and the pool of its synchronous client (one_client.py). Not the pub/sub one
    (kombu's `subclient`, Celery's remote control and gossip): redis-py's PubSub reconnects by
    itself on a read error and then blocks the consumer's loop in a read that nothing answers
    (seen: a worker stalled 12 s in `PubSub.parse_response` under `on_readable`); the consumer
    restart that BRPOP's end causes closes it with the channel anyway."""
    client = channel.__dict__.get("client")  # a cached property: absent until first used
    connection = getattr(client, "connection", None)
    if connection is not None:
        yield connection
    sync = channel.__dict__.get(CLIENT_ATTR)
    if sync is not None:
        pool = sync.connection_pool
        yield from list(getattr(pool, "_in_use_connections", ()))
        yield from list(getattr(pool, "_available_connections", ()))


def end_connections_elsewhere(primary: tuple[str, int]) -> int:
    """Shut down every tracked connection open to a node other than `primary`; how many."""
    ended = 0
    for channel in list(CHANNELS):
        for connection in connections(channel):
            sock = getattr(connection, "_sock", None)
            if sock is None or (str(connection.host), int(connection.port)) == primary:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
                ended += 1
            except OSError:  # already ended
                pass
    return ended


def _follow(client: redis.Redis) -> None:
    pool = client.connection_pool
    while not _stop.wait(FOLLOW_SECONDS):
        try:
            host, port = pool.get_master_address()  # type: ignore[attr-defined]
        except (redis.RedisError, OSError) as error:
            log.warning("asking the sentinels for the primary failed: %s", type(error).__name__)
            continue
        ended = end_connections_elsewhere((str(host), int(port)))
        if ended:
            log.warning(
                "the Redis primary moved: %d broker connection(s) reconnect to the new one", ended
            )


@worker_ready.connect  # type: ignore[untyped-decorator]
def start(**_: Any) -> None:
    settings = get_settings()
    if not is_sentinel_url(settings.redis_url):
        return
    client = sync_client(settings, socket_timeout=5, socket_connect_timeout=5)
    threading.Thread(target=_follow, args=(client,), name="broker-primary", daemon=True).start()


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def stop(**_: Any) -> None:
    _stop.set()
