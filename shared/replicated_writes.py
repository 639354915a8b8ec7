"""The writes that wait for replicas: a Lua script call, or a MULTI/EXEC, followed by PUBLISH
and WAIT (or WAITAOF) in the same non-transactional pipeline, as shared/replica_wait.py says why
and counts how many replicas to wait for.

The API's submits (api/store.py's task_submit, api/batch_store.py's transaction) are answered
only once confirmed: a shortfall is WriteNotReplicated, a 503. A worker's task starts
(worker/store.py) wait the same bounded time but are never refused: the task has been taken
from its queue and must run. The wait is what keeps a start through a failover, so that a rerun
after it counts in `deliveries`; a start not confirmed is a warning.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError
from redis.typing import EncodableT, KeyT, ScriptTextT

from shared.errors import QueueUnavailable, WriteNotReplicated
from shared.replica_wait import ReplicaWait

log = logging.getLogger(__name__)


class ReplicatedScript(AsyncScript):
    """A Lua script whose call is one pipeline [EVALSHA, PUBLISH, WAIT], returning the script's
    reply once WAIT says enough replicas have it (else WriteNotReplicated). With confirm=False
    (a worker's task starts) a shortfall is a warning and the reply is returned all the same."""

    def __init__(
        self, client: aioredis.Redis, script: ScriptTextT, replicas: ReplicaWait, confirm: bool
    ) -> None:
        super().__init__(client, script)
        self._replicas = replicas
        self._confirm = confirm

    async def __call__(
        self,
        keys: Sequence[KeyT] | None = None,
        args: Iterable[EncodableT] | None = None,
        client: aioredis.Redis | aioredis.RedisCluster | None = None,
    ) -> Any:
        try:
            needed = await self._replicas.needed()
        except QueueUnavailable:
            if self._confirm:
                raise
            needed = 0  # nothing to wait for that could answer: write, unconfirmed
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
        try:
            self._replicas.check(acked, needed)
        except WriteNotReplicated:
            if self._confirm:
                raise
            _warn_unconfirmed(needed, self._replicas.timeout_ms)
        return reply


_warned_at = -math.inf


def _warn_unconfirmed(needed: int, timeout_ms: int) -> None:
    """At most one warning in 10 s: a failover sends every start of its seconds here."""
    global _warned_at
    if time.monotonic() - _warned_at >= 10:
        _warned_at = time.monotonic()
        log.warning(
            "task starts not confirmed on %d replica(s) within %d ms: a failover now may drop "
            "them, and a rerun of such a task would not be counted in its deliveries",
            needed,
            timeout_ms,
        )


class ReplicatedWrites(aioredis.Redis):
    """A client on another client's pool whose scripts are ReplicatedScripts: the scripts of
    shared/redis_state registered on it (task_submit) answer only once replicated, or, with
    confirm=False, after a bounded wait for it (worker/store.py's task_start)."""

    def __init__(self, client: aioredis.Redis, replicas: ReplicaWait, confirm: bool = True) -> None:
        super().__init__(connection_pool=client.connection_pool)
        self.replicas = replicas
        self.confirm = confirm

    def register_script(self, script: ScriptTextT) -> AsyncScript:  # type: ignore[override]
        return ReplicatedScript(self, script, self.replicas, self.confirm)


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
