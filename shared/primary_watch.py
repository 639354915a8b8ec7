"""Following a failover on connections that never come back to their pool.

A Sentinel pool (shared/redis_connect.py) asks the sentinels where the primary is whenever it
opens a connection, and drops a connection that is released while they name another node. A
request's connection is released within milliseconds, so requests follow a switch by
themselves. Two kinds of connection are never released while the process runs:

- the result listener's pub/sub subscription (api/waiting.py), held for the process's life;
- the stream hub's blocking XREAD (shared/redis_state/stream_reader.py), back to back.

After a manual failover (SENTINEL FAILOVER) the old primary stays up, taking no writes from
the workers (they moved on) until the sentinels turn it into a replica, up to ~10 s later; a
frozen primary (SIGSTOP) keeps the socket open and silent. In both cases those connections
hear nothing: announcements of ended tasks and new stream entries go to the new primary, and
a waiter is woken only by its 15 s re-read, a stream reader only after the demotion.

A `PrimaryWatch` asks the sentinels once a second (one SENTINEL command, not the primary,
so a frozen primary does not stall it) and drops each watched client's connections that are
on another node (`follow_primary`). The listener and the hub then see a connection error,
reconnect through the sentinels to the new primary, and re-read: the listener wakes every
waiter to read its record again, the hub reads each subscriber's stream after its position.
An announcement lost in the switch thus delays an answer by about a second, not for good.

On a plain URL there is nothing to follow and the watch does not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.redis_connect import follow_primary, on_sentinel

log = logging.getLogger(__name__)

# How often the sentinels are asked: the added delay of an answer after a switch.
FOLLOW_SECONDS = 1.0


class PrimaryWatch:
    """Moves `clients`' held connections to the primary the sentinels name, every second."""

    def __init__(self, clients: Sequence[aioredis.Redis], interval: float = FOLLOW_SECONDS) -> None:
        self._clients = [client for client in clients if on_sentinel(client)]
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.moves = 0  # rounds that dropped a connection elsewhere (read by tests)

    @property
    def active(self) -> bool:
        return bool(self._clients)

    def start(self) -> None:
        if self._clients and self._task is None:
            self._task = asyncio.create_task(self._run(), name="primary-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def check(self) -> bool:
        """One round: True when a connection was dropped (the primary moved)."""
        moved = False
        for client in self._clients:
            try:
                moved |= await follow_primary(client)
            except (RedisError, OSError) as error:  # no sentinel answers: try again next round
                log.warning("asking the sentinels for the primary failed: %s", type(error).__name__)
        if moved:
            self.moves += 1
            log.warning("the Redis primary moved: held connections reconnect to the new one")
        return moved

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check()
