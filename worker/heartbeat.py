"""Liveness for `/ready` and the metrics: each worker beats in the live-worker registry.

The registry is one sorted set (`WORKERS_KEY`, shared/redis_state/keys.py) scored by each worker's
last beat, so the API counts live workers with one ZCOUNT; a worker leaves it on shutdown, and the
beats of the others drop the entry of one that died.

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
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown

from shared.redis_connect import sync_client
from shared.redis_state.keys import STALE_BEATS, WORKERS_KEY
from shared.settings import Settings, get_settings
from worker.kombu_patches import renew_leases

log = logging.getLogger(__name__)

_stop = threading.Event()


def _beat_once(client: redis.Redis, name: str, interval: float) -> None:
    now = time.time()
    with client.pipeline(transaction=False) as pipe:
        pipe.zadd(WORKERS_KEY, {name: now})
        pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - STALE_BEATS * interval)
        pipe.execute()


def _beat(client: redis.Redis, name: str, interval: float) -> None:
    while not _stop.wait(interval):
        try:
            _beat_once(client, name, interval)
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
    _beat_once(client, name, interval)
    _running.update(client=client, name=name)
    threading.Thread(target=_beat, args=(client, name, interval), daemon=True).start()


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def stop_heartbeat(**_: Any) -> None:
    _stop.set()
    if "client" in _running:
        try:  # leave at once, so /ready and the metrics stop counting this worker
            _running["client"].zrem(WORKERS_KEY, _running["name"])
        except redis.RedisError as error:
            log.warning("could not leave the worker registry: %s", type(error).__name__)
