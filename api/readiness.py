"""What `/ready` checks: Redis answers, a worker lives and completes work, the backends answer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pydantic import BaseModel, Field
from redis.exceptions import RedisError, ResponseError

from api.backend_probe import BackendProbe
from shared.backends import Protocol
from shared.errors import redis_write_refusal
from shared.priorities import ALL_QUEUES
from shared.redis_state.keys import (
    LAST_FINISHED_KEY,
    LIVE_BEATS,
    WORKERS_KEY,
    WRITE_PROBE_KEY,
    parse_depth,
    queued_key,
)
from shared.settings import Settings

# Queued work and nothing finished for this long means the workers stopped consuming
# (seen after Redis reconnects: celery#8030), even if their processes still beat.
STALL_SECONDS = 60.0
CHECK_TIMEOUT = 2.0
QUEUED_KEYS = [queued_key(queue) for queue in ALL_QUEUES]
OWN_CHECKS = frozenset({"redis", "workers"})


class BackendHealth(BaseModel):
    """One configured backend's health, as `/ready` found it."""

    protocol: Protocol
    health: str = Field(description='"ok", or why not (naming the URL that failed).')
    gates_readiness: bool = Field(
        description="Whether its health decides `ready` (READY_BACKENDS, else DEFAULT_BACKEND)."
    )


class Readiness(BaseModel):
    """The verdict and, per dependency, "ok" or why not."""

    ready: bool
    checks: dict[str, str] = Field(
        description="What decides `ready`: redis, workers and each gating backend by name."
    )
    backends: dict[str, BackendHealth] = Field(
        default_factory=dict, description="Every configured backend, by name."
    )


async def _check_redis_and_workers(state: Any) -> dict[str, str]:
    client = state.store.redis
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            await client.ping()
            refusal = await _refuses_writes(client)
            live_since = time.time() - LIVE_BEATS * state.settings.worker_heartbeat_interval
            workers = await client.zcount(WORKERS_KEY, live_since, "+inf")
            # Tasks, not messages (one message carries 1..MESSAGE_MAX_TASKS tasks): the same
            # counters as the 429 limit and dispatcher_queue_depth.
            depths = [parse_depth(raw) for raw in await client.mget(QUEUED_KEYS)]
            last_finished = await client.get(LAST_FINISHED_KEY)
    except (RedisError, OSError, TimeoutError) as error:
        return {"redis": f"unreachable ({type(error).__name__})", "workers": "unknown"}
    redis_check = f"refuses writes: {refusal}" if refusal else "ok"
    if not workers:
        return {"redis": redis_check, "workers": "no worker has sent a heartbeat recently"}
    idle = time.time() - float(last_finished) if last_finished else 0.0
    if any(depths) and idle > STALL_SECONDS:
        queued = ", ".join(
            f"{n} task(s) in {q}" for q, n in zip(ALL_QUEUES, depths, strict=True) if n
        )
        return {
            "redis": redis_check,
            "workers": f"tasks queued ({queued}) but none finished for {idle:.0f}s: "
            "workers stalled",
        }
    return {"redis": redis_check, "workers": "ok"}


async def _refuses_writes(client: Any) -> str | None:
    """Why Redis refuses writes, or None when it accepts them."""
    try:
        # Written on every check: a Redis that answers PING may still refuse writes (out of
        # memory under noeviction, a read-only replica after a failover): nothing could be
        # submitted.
        await client.set(WRITE_PROBE_KEY, str(time.time()), ex=60)
    except ResponseError as error:
        reason = redis_write_refusal(error)
        if reason is None:
            raise
        return reason
    return None


def _check_name(name: str) -> str:
    """A gating backend's key in `checks`: its name (`torchserve`, as before backends), unless
    that is the name of another check."""
    return f"backend:{name}" if name in OWN_CHECKS else name


async def check_readiness(state: Any) -> Readiness:
    """Redis and the workers, and every backend asked at once; only the gating backends
    (READY_BACKENDS, else DEFAULT_BACKEND) can make the API unready."""
    settings: Settings = state.settings
    probe: BackendProbe = state.probe
    gating = set(settings.ready_backends or [settings.default_backend])
    checks, healths = await asyncio.gather(_check_redis_and_workers(state), probe.healths())
    backends = {}
    for name, backend in settings.backend_map.items():
        gates = name in gating
        backends[name] = BackendHealth(
            protocol=backend.protocol, health=healths[name], gates_readiness=gates
        )
        if gates:
            checks[_check_name(name)] = healths[name]
    ready = all(value == "ok" for value in checks.values())
    return Readiness(ready=ready, checks=checks, backends=backends)
