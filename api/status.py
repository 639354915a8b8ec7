"""`GET /status` and the console's overview: the figures an operator needs, read from Redis alone.

Everything here comes from what the scripts and the workers keep in Redis (the bounded figures of
shared/redis_state/figures.py, the queue and running counters, the worker registry, the batches in
progress), plus the backends' health from the probe's cache, so the page works without Prometheus
and every API process shows the same numbers. One read is a handful of pipelined commands, bounded
whatever the traffic: 91 bucket hashes, a counter and an oldest-message lookup per class, the live
and gone workers, and at most MAX_BATCHES batches.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime
from typing import cast

import redis.asyncio as aioredis
from pydantic import BaseModel, Field

from api.backend_probe import HEALTH_TTL, BackendProbe
from shared.priorities import QUEUES, Priority
from shared.redis_state.batch import BatchField
from shared.redis_state.figures import Window, percentile, read_window
from shared.redis_state.keys import (
    FIGURES_BUCKET_SECONDS,
    GONE_WORKERS_KEY,
    LIVE_BEATS,
    OPEN_BATCHES_KEY,
    WORKERS_KEY,
    batch_key,
    parse_depth,
    queued_key,
    running_key,
    worker_info_key,
)
from shared.redis_state.status_scripts import QueueOldest
from shared.settings import Settings

# Rates over these windows; percentiles over the longer one.
SHORT, LONG = 60, 300
MAX_BATCHES = 50
TERMINAL = ("succeeded", "failed", "canceled", "expired")


class Latency(BaseModel):
    """Percentiles of one duration over the last 5 minutes, in seconds (null: none measured)."""

    p50: float | None
    p95: float | None
    p99: float | None
    count: int = Field(description="How many durations they are read from.")


class ClassFigures(BaseModel):
    """One priority class (its own Celery queue)."""

    priority: Priority
    queued: int = Field(description="Tasks waiting in its queue.")
    oldest_queued_seconds: float | None = Field(
        description="Age of the oldest message waiting in its queue (its latency, as Sidekiq "
        "calls it); null when the queue is empty."
    )
    in_flight: int = Field(description="Its tasks running now.")
    submitted_per_second_1m: float
    submitted_per_second_5m: float
    finished_per_second_1m: float
    finished_per_second_5m: float
    endings_5m: dict[str, int] = Field(description="Endings by status over the last 5 minutes.")
    failures_by_code_5m: dict[str, int] = Field(
        description="Failed and expired tasks by error code over the last 5 minutes."
    )
    refused_5m: int = Field(description="Submits refused with 429 (its queue full), 5 minutes.")
    queue_wait: Latency = Field(description="Accepted to first started.")
    run_time: Latency = Field(description="Started to finished (succeeded or failed).")
    end_to_end: Latency = Field(description="Accepted to finished (succeeded or failed).")


class ChartPoint(BaseModel):
    """One FIGURES_BUCKET_SECONDS slice of the last 15 minutes, every class together."""

    start: datetime
    submitted: int
    finished: int
    failed: int
    end_to_end_p50: float | None
    end_to_end_p95: float | None


class WorkerInfo(BaseModel):
    """A prediction worker, as its heartbeat describes it."""

    name: str
    host: str | None = None
    pid: int | None = None
    queues: list[str] = Field(default_factory=list)
    slots: int | None = Field(None, description="Calls it may hold at once.")
    in_flight: int | None = Field(None, description="Calls it holds now.")
    last_beat_seconds: float = Field(description="Age of its last heartbeat.")
    live: bool = Field(description="False: it left or stopped beating (shown for an hour).")


class BackendFigures(BaseModel):
    """A configured model server: its health and the run time of the tasks sent to it."""

    name: str
    protocol: str
    health: str = Field(description='"ok", or why not (asked at most 5 s ago).')
    calls_5m: int
    run_time: Latency


class BatchProgress(BaseModel):
    """A batch in progress."""

    batch_id: str
    created_at: datetime
    total: int
    ended: int
    counts: dict[str, int] = Field(description="Its items by status.")
    cancel_requested: bool


class StatusView(BaseModel):
    """`GET /status`: what the console shows, as JSON."""

    generated_at: datetime
    bucket_seconds: int = Field(description="The width of a chart point.")
    classes: list[ClassFigures]
    chart: list[ChartPoint] = Field(description="The last 15 minutes, oldest first.")
    workers: list[WorkerInfo] = Field(description="Live workers first, then the gone ones.")
    backends: list[BackendFigures]
    batches: list[BatchProgress] = Field(description=f"At most {MAX_BATCHES}, oldest first.")


def _latency(window: Window, name: str) -> Latency:
    p50, p95, p99 = window.quantiles(name, LONG)
    return Latency(p50=p50, p95=p95, p99=p99, count=sum(window.histogram(name, LONG).values()))


def class_figures(
    window: Window, priority: Priority, queued: int, running: int, oldest: float | None
) -> ClassFigures:
    """One class's figures from the window and its counters."""
    name = priority.value
    ended = window.matching(f"ended:{name}:", LONG)
    finished = [f"ended:{name}:{status}" for status in TERMINAL]
    return ClassFigures(
        priority=priority,
        queued=max(queued, 0),
        oldest_queued_seconds=None if oldest is None else max(window.now - oldest, 0.0),
        in_flight=max(running, 0),
        submitted_per_second_1m=window.rate(f"submitted:{name}", SHORT),
        submitted_per_second_5m=window.rate(f"submitted:{name}", LONG),
        finished_per_second_1m=sum(window.rate(f, SHORT) for f in finished),
        finished_per_second_5m=sum(window.rate(f, LONG) for f in finished),
        endings_5m={status: ended.get(status, 0) for status in TERMINAL},
        failures_by_code_5m=dict(window.matching(f"code:{name}:", LONG).most_common()),
        refused_5m=window.total(f"refused:{name}", LONG),
        queue_wait=_latency(window, f"wait:{name}"),
        run_time=_latency(window, f"run:{name}"),
        end_to_end=_latency(window, f"e2e:{name}"),
    )


def chart(window: Window) -> list[ChartPoint]:
    """The chart's points: one per bucket, every class together."""
    points = []
    for bucket in window.buckets:
        e2e: Counter[int] = Counter()
        for priority in Priority:
            e2e.update(bucket.histogram(f"e2e:{priority.value}"))
        points.append(
            ChartPoint(
                start=datetime.fromtimestamp(bucket.start, UTC),
                submitted=sum(v for k, v in bucket.counts.items() if k[:10] == "submitted:"),
                finished=sum(v for k, v in bucket.counts.items() if k[:6] == "ended:"),
                failed=sum(
                    v
                    for k, v in bucket.counts.items()
                    if k[:6] == "ended:" and k.rsplit(":", 1)[1] in ("failed", "expired")
                ),
                end_to_end_p50=percentile(e2e, 0.5),
                end_to_end_p95=percentile(e2e, 0.95),
            )
        )
    return points


def _int(raw: str | bytes | None) -> int | None:
    try:
        return int(raw) if raw else None
    except ValueError:
        return None


def _text(raw: str | bytes | None) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw


async def workers(client: aioredis.Redis, settings: Settings, now: float) -> list[WorkerInfo]:
    """Live workers (beat within LIVE_BEATS intervals), then the gone ones of the last hour."""
    live_since = now - LIVE_BEATS * settings.worker_heartbeat_interval
    async with client.pipeline(transaction=False) as pipe:
        pipe.zrange(WORKERS_KEY, 0, -1, withscores=True)
        pipe.zrange(GONE_WORKERS_KEY, 0, -1, withscores=True)
        registered, gone = await pipe.execute()
    beats: dict[str, float] = {}
    for name, score in gone:
        beats[_text(name) or ""] = float(score)
    for name, score in registered:
        beats[_text(name) or ""] = max(float(score), beats.get(_text(name) or "", 0.0))
    names = sorted(beats, key=lambda n: (beats[n] < live_since, n))
    async with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(worker_info_key(name))
        infos = await pipe.execute()
    found = []
    for name, info in zip(names, infos, strict=True):
        fields = {_text(k): _text(v) for k, v in (info or {}).items()}
        queues = fields.get("queues") or ""
        found.append(
            WorkerInfo(
                name=name,
                host=fields.get("host"),
                pid=_int(fields.get("pid")),
                queues=[q for q in queues.split(",") if q],
                slots=_int(fields.get("slots")),
                in_flight=_int(fields.get("in_flight")),
                last_beat_seconds=max(now - beats[name], 0.0),
                live=beats[name] >= live_since,
            )
        )
    return found


async def batches(client: aioredis.Redis) -> list[BatchProgress]:
    """The oldest MAX_BATCHES batches in progress."""
    members = await client.zrange(OPEN_BATCHES_KEY, 0, MAX_BATCHES - 1)
    ids = [_text(cast("str | bytes", i)) or "" for i in members]
    async with client.pipeline(transaction=False) as pipe:
        for batch_id in ids:
            pipe.hgetall(batch_key(batch_id))
        hashes = await pipe.execute()
    found = []
    for batch_id, raw in zip(ids, hashes, strict=True):
        fields = {_text(k): _text(v) for k, v in (raw or {}).items()}
        if not fields.get(BatchField.total.value):
            continue  # expired meanwhile
        found.append(
            BatchProgress(
                batch_id=batch_id,
                created_at=datetime.fromtimestamp(float(fields.get("created_at") or 0), UTC),
                total=_int(fields.get(BatchField.total.value)) or 0,
                ended=_int(fields.get(BatchField.ended.value)) or 0,
                counts={s: _int(fields.get(s)) or 0 for s in ("queued", "running", *TERMINAL)},
                cancel_requested=bool(fields.get(BatchField.cancel_requested_at.value)),
            )
        )
    return found


async def backends(window: Window, probe: BackendProbe, settings: Settings) -> list[BackendFigures]:
    """Each configured backend's health (the probe's cache, at most HEALTH_TTL old) and run time."""
    configured = list(settings.backend_map.values())
    healths = await asyncio.gather(*(probe.health(b, max_age=HEALTH_TTL) for b in configured))
    return [
        BackendFigures(
            name=backend.name,
            protocol=backend.protocol.value,
            health=health,
            calls_5m=sum(window.histogram(f"backend:{backend.name}", LONG).values()),
            run_time=_latency(window, f"backend:{backend.name}"),
        )
        for backend, health in zip(configured, healths, strict=True)
    ]


async def collect(
    client: aioredis.Redis, settings: Settings, probe: BackendProbe, now: float | None = None
) -> StatusView:
    """The whole status, read now."""
    now = time.time() if now is None else now
    classes = list(Priority)
    queues = [QUEUES[p] for p in classes]
    async with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.get(queued_key(queue))
            pipe.get(running_key(queue))
        counters = await pipe.execute()
    window, oldest = await asyncio.gather(read_window(client, now), QueueOldest(client)(queues))
    return StatusView(
        generated_at=datetime.fromtimestamp(now, UTC),
        bucket_seconds=FIGURES_BUCKET_SECONDS,
        classes=[
            class_figures(
                window, p, parse_depth(counters[2 * i]), parse_depth(counters[2 * i + 1]), oldest[i]
            )
            for i, p in enumerate(classes)
        ],
        chart=chart(window),
        workers=await workers(client, settings, now),
        backends=await backends(window, probe, settings),
        batches=await batches(client),
    )
