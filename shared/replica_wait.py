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
from B and drops them (8 such writes were lost with `WAIT 1` in a drill on loopback). Waiting
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
promoted; a replica that joined in the second before a count being promoted at once.

A replica's WAIT ack means it applied the write, not that it is on disk. REDIS_WAIT_AOF asks for
WAITAOF instead (Redis 7.2+), in the same place: `WAITAOF numlocal n timeout` answers
[primaries, replicas] that fsynced the connection's writes to their append-only files, `replicas`
with numlocal 0, `all` with 1 (the primary's own AOF too). A server without it would refuse every
submit's WAITAOF, so the API checks the version (INFO server) at start (check_wait_aof, which
refuses to start naming it) and again on every new primary (a failover onto an older node): its
submits then answer 503 saying why, and /ready says so too. Each replica needs `appendonly yes`,
else it never counts. Not run here against a 7.2 server (the bundled one is 6.2).

The count is also what `/ready` reports (observe): the primary's address, the replicas that
acknowledge, the ones still counted after they left; it joins the count in flight, or starts
one when the last is over REFRESH_SECONDS old, so there is no second poller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
import redis.asyncio.sentinel as async_sentinel
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError, NoScriptError, RedisError, TimeoutError
from redis.typing import EncodableT, KeyT, ScriptTextT

from shared.errors import QueueUnavailable, WriteNotReplicated
from shared.redis_connect import follow_primary, node_client
from shared.settings import Settings
from shared.wait_aof import aof_counts, check_wait_aof, wait_aof_refusal

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


@dataclass(frozen=True, slots=True)
class ReplicaCount:
    """The last count, as `/ready` reports it (addresses as host:port, never credentials)."""

    primary: str
    acking: tuple[str, ...]  # online and acknowledging
    left: tuple[str, ...]  # gone from the primary but answering: counted until GONE_GRACE
    needed: int
    minimum: int
    failed: str | None  # why the last count failed, if it did
    refusal: str | None  # why the primary cannot give REDIS_WAIT_AOF


class ReplicaWait:
    """How many replicas a write must reach (`needed`), counted as the module says; one per
    client (`of`), shared by the submit paths that write through it."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self._client = client
        self._settings = settings
        self.minimum = settings.min_replicas
        self.timeout_ms = settings.redis_replica_wait_ms
        self.aof = settings.redis_wait_aof != "off"
        self.numlocal = 1 if settings.redis_wait_aof == "all" else 0
        self._needed = self.minimum
        self.primary = primary_address(client)
        self.refusal: str | None = None
        self._failed: str | None = None
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
        """Whether a submit waits at all: for replicas, or for the primary's own AOF."""
        return self.minimum > 0 or self.numlocal > 0

    def waits(self, needed: int) -> bool:
        return needed > 0 or self.numlocal > 0

    async def start(self) -> None:
        """At start-up: raise WaitAofUnsupported when REDIS_WAIT_AOF cannot be given."""
        await check_wait_aof(self._client, self._settings)

    async def needed(self) -> int:
        """Replicas the next write must reach: the first call waits for a count, later ones
        start a new count in the background once the last is REFRESH_SECONDS old."""
        if self.minimum == 0:
            return 0
        if self._refreshed == -math.inf:
            await self._first_count()
        elif time.monotonic() - self._refreshed > REFRESH_SECONDS:
            self._count_in_background()
        if self.refusal is not None:  # nothing written: the WAITAOF would be refused
            raise QueueUnavailable(f"the task queue (Redis) cannot take submits: {self.refusal}")
        return self._needed

    async def observe(self) -> ReplicaCount:
        """The count for `/ready`: the one in flight, or a new one if the last is stale."""
        if self.minimum == 0:
            try:
                await follow_primary(self._client)
                self._failed = None
            except (RedisError, OSError) as error:
                self._failed = type(error).__name__
            self.primary = primary_address(self._client)
        elif self._refreshed == -math.inf:
            try:
                await self._first_count()
            except (RedisError, OSError) as error:
                self._failed = type(error).__name__
        elif time.monotonic() - self._refreshed > REFRESH_SECONDS or self._counting():
            self._count_in_background()
            await asyncio.shield(cast(asyncio.Task[None], self._background))
        known = self._known.items()
        return ReplicaCount(
            primary=self.primary,
            acking=tuple(_text(address) for address, since in known if since is None),
            left=tuple(_text(address) for address, since in known if since is not None),
            needed=self._needed,
            minimum=self.minimum,
            failed=self._failed,
            refusal=self.refusal,
        )

    def queue_wait(self, pipe: Pipeline, needed: int) -> None:
        """Queue the propagated no-op and WAIT (or WAITAOF) on `pipe`, after its writes."""
        pipe.publish(PROBE_CHANNEL, "")
        if self.aof:
            pipe.execute_command("WAITAOF", self.numlocal, needed, self.timeout_ms)
        else:
            pipe.execute_command("WAIT", needed, self.timeout_ms)

    def check(self, acked: object, needed: int) -> None:
        """Raise WriteNotReplicated unless WAIT's reply says `needed` replicas have the write
        (WAITAOF's: [local, replicas], and the primary's own fsync too with `all`)."""
        local, reached = self.numlocal, acked if isinstance(acked, int) else 0
        if self.aof:
            local, reached = aof_counts(acked)
        if reached > len(self._known):  # a replica joined since the last count
            self._count_in_background()
        if reached >= needed and local >= self.numlocal:
            return
        what = f"{needed} replica(s) hold this write ({reached} did)"
        if self.aof:
            what = (
                f"{needed} replica(s) fsynced this write to their append-only files ({reached} did)"
            )
            if self.numlocal:
                what += f" and the primary to its own ({'done' if local else 'not done'})"
        if isinstance(acked, Exception):
            what += f"; Redis refused {'WAITAOF' if self.aof else 'WAIT'} ({type(acked).__name__})"
        raise WriteNotReplicated(
            f"the task queue (Redis) could not confirm within {self.timeout_ms} ms that "
            f"{what}: it may not survive a "
            "failover. Retry in a few seconds: with the same Idempotency-Key the retry is "
            "safe (it answers with what this request wrote); without one the work may run twice"
        )

    async def refresh(self) -> None:
        """Count the live replicas now (see the module docstring)."""
        await follow_primary(self._client)
        self.primary = primary_address(self._client)
        info = await self._client.info("replication")
        self._refreshed = time.monotonic()
        self._failed = None
        if info.get("role") != "master":
            return  # a node being demoted: writes there fail anyway, keep the count
        replid = str(info.get("master_replid", ""))
        if replid != self._replid:
            # A new primary may be an older Redis (or have its AOF off): say so, once.
            self.refusal = await wait_aof_refusal(self._client, self._settings)
            self._replid, self._known = replid, {}
            if self.refusal is not None:
                log.error("REDIS_WAIT_AOF cannot be given: %s", self.refusal)
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

    async def _first_count(self) -> None:
        if self._first is None or self._first.done():
            self._first = asyncio.create_task(self.refresh(), name="replica-count")
        await asyncio.shield(self._first)

    def _counting(self) -> bool:
        return self._background is not None and not self._background.done()

    def _count_in_background(self) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.create_task(self._quietly(), name="replica-count")

    async def _quietly(self) -> None:
        try:
            await self.refresh()
        except (RedisError, OSError) as error:  # the submits' own calls report an outage
            self._refreshed = time.monotonic()
            self._failed = type(error).__name__
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


def primary_address(client: aioredis.Redis) -> str:
    """Where `client` writes, as host:port (on Sentinel: the primary the sentinels last named,
    "unknown" before any was asked); never its credentials."""
    pool = client.connection_pool
    if isinstance(pool, async_sentinel.SentinelConnectionPool):
        found = pool.master_address
        return _text(found) if found else "unknown"
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return _text((str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379))))


def _text(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
        if client is not None or not self._replicas.waits(needed):
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
    if not replicas.waits(needed):
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
