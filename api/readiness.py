"""What `/ready` checks: Redis answers, a worker lives and completes work, the backends answer.

It names the Redis primary it writes to and, when submits wait for replicas (REDIS_MIN_REPLICAS,
1 by default on Sentinel), the replicas the API counts (shared/replica_wait.py's count, joined or
refreshed, never a second poller). Fewer replicas acknowledging than a submit waits for is a
`replicas` check that is not ok, and so not ready: every submit would answer 503. Why unready
rather than ready-with-a-warning: `/ready` says whether this process can get predictions done,
as it does when Redis is unreachable; a load balancer (a Kubernetes Service, an ALB target group)
then stops sending new requests to it but does not restart it (liveness is `/health`). Every API
process shares the verdict (one Redis), so with all of them out a Kubernetes Service has no
endpoint and the ingress answers 503 itself, and an ALB fails open and routes to all: clients see
a 503 either way, as they would from the submits. A failover's switch lasts a few seconds, within
a usual probe's failureThreshold (3 x 10 s), so it rarely takes a process out.
"""

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
from shared.redis_url import is_sentinel_url
from shared.replica_wait import GONE_GRACE, ReplicaCount, ReplicaWait
from shared.settings import Settings

# Queued work and nothing finished for this long means the workers stopped consuming
# (seen after Redis reconnects: celery#8030), even if their processes still beat.
STALL_SECONDS = 60.0
CHECK_TIMEOUT = 2.0
QUEUED_KEYS = [queued_key(queue) for queue in ALL_QUEUES]
OWN_CHECKS = frozenset({"redis", "workers", "replicas"})


class BackendHealth(BaseModel):
    """One configured backend's health, as `/ready` found it."""

    protocol: Protocol
    health: str = Field(description='"ok", or why not (naming the URL that failed).')
    gates_readiness: bool = Field(
        description="Whether its health decides `ready` (READY_BACKENDS, else DEFAULT_BACKEND)."
    )


class RedisNodes(BaseModel):
    """The Redis primary this process writes to and the replicas its submits wait for."""

    primary: str = Field(
        description="host:port (on Sentinel: the primary the sentinels name now; `unknown` if "
        "none answered); never a password."
    )
    sentinel: bool = Field(description="Whether REDIS_URL names sentinels.")
    replicas: list[str] | None = Field(
        description="Replicas acknowledging writes (host:port), counted each second; null when "
        "submits wait for none (REDIS_MIN_REPLICAS 0)."
    )
    replicas_needed: int = Field(
        description="How many a submit waits for: every counted replica, at least "
        "`min_replicas`; fewer acknowledging and submits answer 503."
    )
    min_replicas: int = Field(description="REDIS_MIN_REPLICAS (or its default).")


class Readiness(BaseModel):
    """The verdict and, per dependency, "ok" or why not."""

    ready: bool
    checks: dict[str, str] = Field(
        description="What decides `ready`: redis, workers, replicas (when submits wait for "
        "any) and each gating backend by name."
    )
    backends: dict[str, BackendHealth] = Field(
        default_factory=dict, description="Every configured backend, by name."
    )
    redis: RedisNodes | None = Field(None, description="The primary and its replicas.")


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


async def _check_replicas(state: Any) -> tuple[RedisNodes, dict[str, str]]:
    """The primary and the replicas as last counted, and the `replicas` check when submits wait
    for replicas (and `redis`'s when the primary cannot give REDIS_WAIT_AOF)."""
    settings: Settings = state.settings
    waiting = ReplicaWait.of(state.store.redis, settings)
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            count = await waiting.observe()
    except TimeoutError:
        count = None
    checks: dict[str, str] = {}
    if count is not None and count.refusal is not None:
        checks["redis"] = count.refusal
    if count is None or waiting.minimum == 0:
        if waiting.minimum:
            checks["replicas"] = f"not counted within {CHECK_TIMEOUT:g} s: submits may answer 503"
        return _nodes(settings, waiting.primary, count), checks
    checks["replicas"] = _replicas_verdict(count)
    return _nodes(settings, count.primary, count), checks


def _replicas_verdict(count: ReplicaCount) -> str:
    if count.failed is not None:
        return f"not counted ({count.failed}): submits may answer 503"
    acking = len(count.acking)
    if acking >= count.needed:
        return "ok"
    if count.left:
        return (
            f"{acking} of {count.needed} replicas acknowledge writes ({', '.join(count.left)} "
            f"left the primary and still answer: counted for up to {GONE_GRACE:g} s): "
            "submits answer 503"
        )
    plural = "replica" if count.needed == 1 else "replicas"
    return f"{acking} of at least {count.needed} {plural} acknowledge writes: submits answer 503"


def _nodes(settings: Settings, primary: str, count: ReplicaCount | None) -> RedisNodes:
    return RedisNodes(
        primary=primary,
        sentinel=is_sentinel_url(settings.redis_url),
        replicas=list(count.acking) if count is not None and count.minimum else None,
        replicas_needed=count.needed if count is not None else settings.min_replicas,
        min_replicas=settings.min_replicas,
    )


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
    checks, (nodes, replicas), healths = await asyncio.gather(
        _check_redis_and_workers(state), _check_replicas(state), probe.healths()
    )
    if checks["redis"] == "ok" and "redis" in replicas:
        checks["redis"] = replicas["redis"]
    if "replicas" in replicas:
        unreachable = checks["redis"].startswith("unreachable")
        checks["replicas"] = "unknown" if unreachable else replicas["replicas"]
    backends = {}
    for name, backend in settings.backend_map.items():
        gates = name in gating
        backends[name] = BackendHealth(
            protocol=backend.protocol, health=healths[name], gates_readiness=gates
        )
        if gates:
            checks[_check_name(name)] = healths[name]
    ready = all(value == "ok" for value in checks.values())
    return Readiness(ready=ready, checks=checks, backends=backends, redis=nodes)
