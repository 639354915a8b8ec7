"""Liveness for `/ready`, the metrics and the console: each worker beats in the worker registry.

The registry is one sorted set (`WORKERS_KEY`, shared/redis_state/keys.py) scored by each worker's
last beat, so the API counts live workers with one ZCOUNT; a worker leaves it on shutdown, and the
beats of the others drop the entry of one that died. Each beat also rewrites the worker's own
description (`worker_info_key`: host, pid, queues, slots, calls in flight; it expires LIVE_BEATS
intervals after the last beat) for the console, and a worker that leaves, or that the others drop,
moves to `GONE_WORKERS_KEY` with its last beat, kept GONE_WORKERS_SECONDS: an operator sees that
a worker went away and when, not only that there are fewer.

Whether workers also *complete* work is judged from `LAST_FINISHED_KEY` (api/readiness.py).
The same beat renews the broker lease of every message the worker holds (`renew_leases`,
worker/kombu_patches/leases.py: it writes into kombu's unacked index).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, cast

import redis
from celery.signals import worker_ready, worker_shutdown

from shared.redis_connect import sync_client
from shared.redis_state.keys import (
    GONE_WORKERS_KEY,
    GONE_WORKERS_SECONDS,
    LIVE_BEATS,
    STALE_BEATS,
    WORKERS_KEY,
    worker_info_key,
)
from shared.settings import Settings, get_settings
from worker.kombu_patches import renew_leases

log = logging.getLogger(__name__)

_stop = threading.Event()


def _in_flight() -> int | None:
    """The calls this process's engine holds now (None before it started)."""
    from worker.consumer import running_engine  # the consumer imports this module's signals

    engine = running_engine()
    return None if engine is None else engine.held


def describe(sender: Any, settings: Settings) -> dict[str, str]:
    """The fixed part of this worker's description: host, pid, its queues and slots."""
    try:
        queues = sorted(sender.app.amqp.queues.consume_from)
    except AttributeError:
        queues = []
    return {
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "queues": ",".join(queues),
        "slots": str(settings.worker_max_in_flight),
    }


def _beat_once(
    client: redis.Redis, name: str, interval: float, info: dict[str, str] | None = None
) -> None:
    now = time.time()
    stale = now - STALE_BEATS * interval
    dropped = cast(
        "list[tuple[bytes, float]]",
        client.zrangebyscore(WORKERS_KEY, "-inf", stale, withscores=True),
    )
    with client.pipeline(transaction=False) as pipe:
        pipe.zadd(WORKERS_KEY, {name: now})
        if dropped:  # workers that died: gone, with their last beat (one that beat meanwhile
            # stays registered, as the removal is by score, and leaves the gone set next beat)
            pipe.zadd(GONE_WORKERS_KEY, dict(dropped))
        pipe.zremrangebyscore(WORKERS_KEY, "-inf", stale)
        pipe.zrem(GONE_WORKERS_KEY, name)
        pipe.zremrangebyscore(GONE_WORKERS_KEY, "-inf", now - GONE_WORKERS_SECONDS)
        if info is not None:
            key = worker_info_key(name)
            in_flight = _in_flight()
            flight = "" if in_flight is None else str(in_flight)
            pipe.hset(key, mapping={**{k: v for k, v in info.items()}, "in_flight": flight})
            pipe.expire(key, max(int(LIVE_BEATS * interval), 1))
        pipe.execute()


def _beat(client: redis.Redis, name: str, interval: float, info: dict[str, str]) -> None:
    while not _stop.wait(interval):
        try:
            _beat_once(client, name, interval, info)
            renew_leases(client)
        except redis.RedisError as error:
            log.warning("heartbeat failed: %s", type(error).__name__)


_running: dict[str, Any] = {}


def connect(settings: Settings) -> redis.Redis:
    """The heartbeat's own client (a thread of its own, so a sync one), on the primary."""
    return sync_client(settings, socket_timeout=5, socket_connect_timeout=5)


@worker_ready.connect  # type: ignore[untyped-decorator]
def start_heartbeat(sender: Any = None, **_: Any) -> None:
    settings = get_settings()
    client = connect(settings)
    name = getattr(sender, "hostname", None) or f"{os.getpid()}@{socket.gethostname()}"
    interval = settings.worker_heartbeat_interval
    info = describe(sender, settings)
    _beat_once(client, name, interval, info)
    _running.update(client=client, name=name)
    threading.Thread(target=_beat, args=(client, name, interval, info), daemon=True).start()


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def stop_heartbeat(**_: Any) -> None:
    _stop.set()
    if "client" in _running:
        try:  # leave at once, so /ready and the metrics stop counting this worker
            client, name = _running["client"], _running["name"]
            with client.pipeline(transaction=False) as pipe:
                pipe.zrem(WORKERS_KEY, name)
                pipe.zadd(GONE_WORKERS_KEY, {name: time.time()})
                pipe.delete(worker_info_key(name))
                pipe.execute()
        except redis.RedisError as error:
            log.warning("could not leave the worker registry: %s", type(error).__name__)
