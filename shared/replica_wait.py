"""Submits answered only once every live replica holds them: WAIT after the write, same connection.

Replication is asynchronous: a primary acknowledges a write before its replicas have it, and a
failover drops whatever the promoted replica had not received ("last failover wins"). So every
submit path (the group commit's task_submit, a batch's MULTI/EXEC) ends with `WAIT n timeout`
in the same non-transactional pipeline as its write, and is answered 200/202 only when WAIT
reports at least `n` replicas; else WriteNotReplicated, a 503 `queue_unavailable` saying the
write may not survive a failover and that a retry with the same Idempotency-Key is safe.
A PUBLISH to a channel nobody reads goes between the write and the WAIT: it is propagated, so
WAIT counts from the server's latest offset, which also covers a write this connection did not
make (the record a replay answers with; Redis 7 counts only a connection's own writes).

Why every live replica, not REDIS_MIN_REPLICAS: one replica's ack does not survive a failover
that promotes the other. In a manual failover Sentinel promotes replica B while the old primary
still takes writes; replica A, still following the old primary, acknowledges them, then resyncs
from B and drops them (8 such writes were lost with `WAIT 1`, /work/notes/issue19.md). Waiting
for every replica the primary had closes that window by design: once B leaves the old primary,
`n` cannot be reached there, so nothing written in the switch is acknowledged. `n` is
max(REDIS_MIN_REPLICAS, live replicas), counted every second (`INFO replication`) and never
lowered on a guess: a replica counts while the primary sees it online and acking, and after it
leaves, until it is found dead (a refused or unanswered PING: killed, frozen, its machine gone)
or has been gone GONE_GRACE; one that left but answers (promoted, following someone else,
resyncing) still counts, so writes are refused meanwhile. A new primary (a new replication id)
starts the count afresh. Each count first asks the sentinels where the primary is
(shared/redis_connect.py follow_primary), so the API leaves a demoted primary within a second
instead of taking refused writes there until Sentinel demotes it (~10 s on Redis 6.2).

The alternative, keeping each process's recent submits and rewriting them on the new primary
after a switch, would answer faster during a failover but depends on the API process outliving
the switch and on idempotent replays of writes already consumed; waiting keeps the guarantee in
Redis. What stays possible: losing the primary and every replica that acknowledged at once; a
replica the sentinels can reach but the API cannot (a partition) being counted dead and then
promoted; a replica that joined in the second before a count being promoted at once. Redis
6.2 has no WAITAOF (7.2+), so a replica's ack means it applied the write, not that it is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError, NoScriptError, RedisError, TimeoutError
from redis.typing import EncodableT, KeyT, ScriptTextT

from shared.errors import WriteNotReplicated
from shared.redis_connect import follow_primary, node_client
from shared.settings import Settings

log = logging.getLogger(__name__)

# The channel of the propagated no-op between a write and its WAIT (never subscribed to).
PROBE_CHANNEL = "dispatch:replicated"
# How often the live replicas are counted while submits come in.
REFRESH_SECONDS = 1.0
# A replica that has not acknowledged for this long (it does every second) is checked.
LAG_LIMIT = 3
# How long a replica that left the primary but still answers goes on counting.
GONE_GRACE = 30.0
# A PING to a replica that left: no answer within this and it counts as dead.
PROBE_TIMEOUT = 0.5

Address = tuple[str, int]


class ReplicaWait:
    """How many replicas a write must reach (`needed`), counted as the module says; one per
    client (`of`), shared by the submit paths that write through it."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self._client = client
        self._settings = settings
        self.minimum = settings.min_replicas
        self.timeout_ms = settings.redis_replica_wait_ms
        self._needed = self.minimum
        # Replicas of the current primary that count: None while online, else since when gone.
        self._known: dict[Address, float | None] = {}
        self._replid = ""
        self._refreshed = -math.inf
        self._first: asyncio.Task[None] | None = None
        self._background: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, client: aioredis.Redis, settings: Settings) -> ReplicaWait:
        """The one ReplicaWait of `client` (the API's stores share their client)."""
        found = _BY_CLIENT.get(client)
        if found is None:
            found = _BY_CLIENT[client] = cls(client, settings)
        return found

    @property
    def enabled(self) -> bool:
        return self.minimum > 0

    async def needed(self) -> int:
        """Replicas the next write must reach: the first call waits for a count, later ones
        start a new count in the background once the last is REFRESH_SECONDS old."""
        if not self.enabled:
            return 0
        if self._refreshed == -math.inf:
            if self._first is None or self._first.done():
                self._first = asyncio.create_task(self.refresh(), name="replica-count")
            await asyncio.shield(self._first)
        elif time.monotonic() - self._refreshed > REFRESH_SECONDS:
            self._count_in_background()
        return self._needed

    def queue_wait(self, pipe: Pipeline, needed: int) -> None:
        """Queue the propagated no-op and WAIT on `pipe`, after its writes."""
        pipe.publish(PROBE_CHANNEL, "")
        pipe.execute_command("WAIT", needed, self.timeout_ms)

    def check(self, acked: object, needed: int) -> None:
        """Raise WriteNotReplicated unless WAIT's reply says `needed` replicas have the write."""
        reached = acked if isinstance(acked, int) else 0
        if reached > len(self._known):  # a replica joined since the last count
            self._count_in_background()
        if reached >= needed:
            return
        raise WriteNotReplicated(
            f"the task queue (Redis) could not confirm within {self.timeout_ms} ms that "
            f"{needed} replica(s) hold this write ({reached} did): it may not survive a "
            "failover. Retry in a few seconds: with the same Idempotency-Key the retry is "
            "safe (it answers with what this request wrote); without one the work may run twice"
        )

    async def refresh(self) -> None:
        """Count the live replicas now (see the module docstring)."""
        await follow_primary(self._client)
        info = await self._client.info("replication")
        self._refreshed = time.monotonic()
        if info.get("role") != "master":
            return  # a node being demoted: writes there fail anyway, keep the count
        replid = str(info.get("master_replid", ""))
        if replid != self._replid:
            self._replid, self._known = replid, {}
        online = set(_online_replicas(info))
        now = time.monotonic()
        for address in online:
            self._known[address] = None
        gone = [address for address in self._known if address not in online]
        answers = await asyncio.gather(*(self._answers(address) for address in gone))
        for address, answered in zip(gone, answers, strict=True):
            since = self._known[address]
            if since is None:
                self._known[address] = since = now
            if not answered or now - since > GONE_GRACE:
                del self._known[address]
        self._needed = max(self.minimum, len(self._known))

    def _count_in_background(self) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.create_task(self._quietly(), name="replica-count")

    async def _quietly(self) -> None:
        try:
            await self.refresh()
        except (RedisError, OSError) as error:  # the submits' own calls report an outage
            self._refreshed = time.monotonic()
            log.warning("counting Redis replicas failed: %s", type(error).__name__)

    async def _answers(self, address: Address) -> bool:
        client = node_client(self._settings, *address, timeout=PROBE_TIMEOUT)
        try:
            await client.ping()
        except (ConnectionError, TimeoutError, OSError):
            return False
        except RedisError:  # it answers, if only to refuse (auth, loading)
            return True
        finally:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
        return True


_BY_CLIENT: weakref.WeakKeyDictionary[aioredis.Redis, ReplicaWait] = weakref.WeakKeyDictionary()


def _online_replicas(info: dict[str, Any]) -> Iterable[Address]:
    for key, value in info.items():
        if not (key.startswith("slave") and isinstance(value, dict)):
            continue
        if value.get("state") == "online" and int(value.get("lag", 0)) <= LAG_LIMIT:
            yield str(value["ip"]), int(value["port"])


class ReplicatedScript(AsyncScript):
    """A Lua script whose call is one pipeline [EVALSHA, PUBLISH, WAIT], returning the script's
    reply once WAIT says enough replicas have it (else WriteNotReplicated)."""

    def __init__(self, client: aioredis.Redis, script: ScriptTextT, replicas: ReplicaWait) -> None:
        super().__init__(client, script)
        self._replicas = replicas

    async def __call__(
        self,
        keys: Sequence[KeyT] | None = None,
        args: Iterable[EncodableT] | None = None,
        client: aioredis.Redis | aioredis.RedisCluster | None = None,
    ) -> Any:
        needed = await self._replicas.needed()
        if client is not None or needed == 0:
            return await super().__call__(keys, args, client)
        key_list = list(keys or [])
        values = [*key_list, *(args or [])]
        owner = cast(aioredis.Redis, self.registered_client)
        for attempt in (1, 2):
            async with owner.pipeline(transaction=False) as pipe:
                pipe.evalsha(self.sha, len(key_list), *values)
                self._replicas.queue_wait(pipe, needed)
                reply, _, acked = await pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError) and attempt == 1:  # a new primary: load it
                self.sha = await owner.script_load(self.script)
                continue
            break
        if isinstance(reply, Exception):
            raise reply
        self._replicas.check(acked, needed)
        return reply


class ReplicatedWrites(aioredis.Redis):
    """A client on another client's pool whose scripts are ReplicatedScripts: the scripts of
    shared/redis_state registered on it (task_submit) answer only once replicated."""

    def __init__(self, client: aioredis.Redis, replicas: ReplicaWait) -> None:
        super().__init__(connection_pool=client.connection_pool)
        self.replicas = replicas

    def register_script(self, script: ScriptTextT) -> AsyncScript:  # type: ignore[override]
        return ReplicatedScript(self, script, self.replicas)


async def replicated_transaction(
    client: aioredis.Redis, replicas: ReplicaWait, queue: Callable[[Pipeline], Awaitable[None]]
) -> list[Any]:
    """MULTI, what `queue` puts on the pipeline, EXEC, then PUBLISH and WAIT, in one
    non-transactional pipeline (WAIT inside a MULTI would not wait); the EXEC's replies, once
    WAIT says enough replicas have them. An error of the transaction is raised as a
    transactional pipeline would raise it (the first one), before any WAIT verdict."""
    needed = await replicas.needed()
    if needed == 0:
        async with client.pipeline(transaction=True) as pipe:
            await queue(pipe)
            return await pipe.execute()
    async with client.pipeline(transaction=False) as pipe:
        pipe.execute_command("MULTI")
        await queue(pipe)
        queued = len(pipe.command_stack) - 1
        pipe.execute_command("EXEC")
        replicas.queue_wait(pipe, needed)
        replies = await pipe.execute(raise_on_error=False)
    head, executed, acked = replies[: queued + 1], replies[queued + 1], replies[-1]
    for reply in head:  # MULTI's and the commands' QUEUED, or why one was refused
        if isinstance(reply, Exception):
            raise reply
    if isinstance(executed, Exception):  # EXECABORT and the like: nothing was written
        raise executed
    for reply in executed:
        if isinstance(reply, Exception):
            raise reply
    replicas.check(acked, needed)
    return cast(list[Any], executed)
