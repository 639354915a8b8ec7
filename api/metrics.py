"""The API's Prometheus metrics and `GET /metrics`.

Per request: one ASGI middleware (`HttpMetrics`) counts and times it under its route template.
Per submission: the store tells `ApiMetrics` of accepted tasks; the middleware counts refused ones
from their error body (a refusal is an error of POST /dispatch_model that names no task). Waiting
requests: the waiter tells `ApiMetrics`. Neither is in a request's path: `ApiMetrics` is a plain
observer, passed to the store and the waiter when api/main.py builds them. Queue depth, tasks held
by workers and live workers are read from Redis when Prometheus scrapes (one pipelined round trip
per scrape, none per request).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request, Response
from kombu.transport.redis import Channel
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import mark_process_dead
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import OwnerDep
from api.store import ApiStore
from shared.priorities import ALL_QUEUES, Priority
from shared.prometheus import LATENCY_BUCKETS, ModelLabels, multiprocess_dir, scrape_registry
from shared.redis_state.keys import LIVE_BEATS, WORKERS_KEY, parse_depth, queued_key
from shared.settings import Settings

log = logging.getLogger(__name__)

HTTP_REQUESTS = Counter(
    "dispatcher_http_requests",
    "HTTP requests by route template, method and status.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "dispatcher_http_request_duration_seconds",
    "HTTP request duration (s), synchronous waits included.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
TASKS_SUBMITTED = Counter(
    "dispatcher_tasks_submitted",
    "Tasks accepted and enqueued, by model, priority class and backend.",
    ["model", "priority", "backend"],
)
SUBMIT_REJECTIONS = Counter(
    "dispatcher_submit_rejections",
    "Submissions refused before a task existed, by error code (queue_full, payload_too_large...).",
    ["code"],
)
WAITING_REQUESTS = Gauge(
    "dispatcher_waiting_requests",
    "Requests blocked waiting for a task to end (sync dispatches and long polls).",
    multiprocess_mode="livesum",
)

SUBMIT_ROUTE = "/dispatch_model"
UNMATCHED_ROUTE = "unmatched"  # every path no route matches: one series, not one per path
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
ERROR_CODE = re.compile(r"[a-z_]{1,40}")
STATE_TIMEOUT = 2.0


class HttpMetrics:
    """ASGI middleware: requests and their duration by route template, plus refused submissions.

    Outermost, so it also sees what other middlewares answer (the 413 of the body limit).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # (route, method, status) -> the label children: labels() takes a lock and builds a key
        # on every call; this lookup does neither.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = scope["method"]
        status = 500  # unless a response starts: an exception reached the server
        submit = method == "POST" and scope["path"] == SUBMIT_ROUTE
        root_path = scope.get("root_path", "")
        error_body: list[bytes] | None = None

        async def send_counted(message: Message) -> None:
            nonlocal status, error_body
            if message["type"] == "http.response.start":
                status = message["status"]
                if submit and status >= 400:
                    error_body = []
            elif error_body is not None and message["type"] == "http.response.body":
                error_body.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            elapsed = time.perf_counter() - started
            self._observe(_template(scope, root_path), method, status, elapsed)
            if error_body is not None:
                count_rejection(b"".join(error_body))

    def _observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            label = method if method in METHODS else "other"
            children = (
                HTTP_REQUESTS.labels(route, label, str(status)),
                HTTP_DURATION.labels(route, label),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)


def _template(scope: Scope, root_path: str) -> str:
    """The matched route's path template; `<mount>/{path}` inside a mounted app (the routers
    extend `root_path` by the mount's prefix, and FastAPI's sets no `route` for mounts)."""
    route = getattr(scope.get("route"), "path", None)
    if route:
        return str(route)
    mounted: str = scope.get("root_path", "")
    if mounted != root_path and mounted.startswith(root_path):
        return mounted[len(root_path) :] + "/{path}"
    return UNMATCHED_ROUTE


def count_rejection(body: bytes) -> None:
    """Count an error answer to POST /dispatch_model that names no task: nothing was enqueued."""
    try:
        error = json.loads(body)
    except ValueError:
        error = None
    if not isinstance(error, dict):
        SUBMIT_REJECTIONS.labels("other").inc()
        return
    if error.get("task_id"):
        return  # the task was accepted, then failed or could not be waited for
    code = str(error.get("code", ""))
    SUBMIT_REJECTIONS.labels(code if ERROR_CODE.fullmatch(code) else "other").inc()


class ApiMetrics:
    """The observer the store and the waiter report to (api/main.py passes it to both).

    `submitted`: an accepted submit (`dispatcher_tasks_submitted`: the backend label is a
    configured backend's name, so its values are as bounded as the settings); `started_waiting` and
    `stopped_waiting`: `dispatcher_waiting_requests`, summed over API processes.
    """

    def __init__(self) -> None:
        self._models = ModelLabels()
        # (model, priority, backend) -> its child: labels() takes a lock and builds a key on
        # every call.
        self._submitted: dict[tuple[str, Priority, str], Any] = {}

    def submitted(self, model_name: str, priority: Priority, backend: str) -> None:
        key = (model_name, priority, backend)
        child = self._submitted.get(key)
        if child is None:
            child = TASKS_SUBMITTED.labels(self._models(model_name), priority.value, backend)
            self._submitted[key] = child
        child.inc()

    def started_waiting(self) -> None:
        WAITING_REQUESTS.inc()

    def stopped_waiting(self) -> None:
        WAITING_REQUESTS.dec()


class QueueState:
    """Collector of what Redis holds right now; built for one scrape by `read_queue_state`."""

    def __init__(
        self,
        depth: dict[str, int] | None = None,
        in_flight: int | None = None,
        workers: int | None = None,
    ) -> None:
        self.depth, self.in_flight, self.workers = depth, in_flight, workers

    def collect(self) -> Iterable[Metric]:
        up = self.depth is not None
        yield GaugeMetricFamily(
            "dispatcher_redis_up", "Whether this scrape could read Redis.", value=float(up)
        )
        if not up:  # unknown is absent, not 0: a 0 would read as "queue empty, no workers"
            return
        depth = GaugeMetricFamily(
            "dispatcher_queue_depth",
            "Tasks waiting in their class's queue, not yet started by a worker.",
            labels=["queue"],
        )
        for queue, tasks in (self.depth or {}).items():  # one per priority class
            depth.add_metric([queue], float(tasks))
        yield depth
        yield GaugeMetricFamily(
            "dispatcher_tasks_in_flight",
            "Messages fetched by workers and not yet acknowledged: running or prefetched.",
            value=float(self.in_flight or 0),
        )
        yield GaugeMetricFamily(
            "dispatcher_workers_alive",
            "Workers whose last beat is recent (3 heartbeat intervals).",
            value=float(self.workers or 0),
        )


async def read_queue_state(client: aioredis.Redis | None, settings: Settings) -> QueueState:
    if client is None:  # no lifespan (an in-process test client): nothing to read
        return QueueState()
    live_since = time.time() - LIVE_BEATS * settings.worker_heartbeat_interval
    try:
        async with asyncio.timeout(STATE_TIMEOUT), client.pipeline(transaction=False) as pipe:
            for queue in ALL_QUEUES:  # tasks, not messages: one message may carry several
                pipe.get(queued_key(queue))
            # Kombu's Redis transport moves a fetched message out of the list into this index
            # until it is acked: without it, a worker's prefetched and running tasks look done.
            pipe.zcard(Channel.unacked_index_key)
            pipe.zcount(WORKERS_KEY, live_since, "+inf")
            *depths, in_flight, workers = await pipe.execute()
    except (RedisError, OSError, TimeoutError) as error:
        log.warning("metrics could not read Redis: %s", type(error).__name__)
        return QueueState()
    depth = {queue: parse_depth(tasks) for queue, tasks in zip(ALL_QUEUES, depths, strict=True)}
    return QueueState(depth, int(in_flight), int(workers))


async def _keyed(_: OwnerDep) -> None:
    """METRICS_REQUIRE_KEY=true: /metrics needs an API key like the endpoints."""


def install_metrics(app: FastAPI, settings: Settings) -> None:
    """The request middleware and `GET /metrics`; call after every other middleware is added."""
    app.add_middleware(HttpMetrics)
    dependencies = [Depends(_keyed)] if settings.metrics_require_key else []

    @app.get("/metrics", include_in_schema=False, dependencies=dependencies)
    async def metrics(request: Request) -> Response:
        store: ApiStore | None = getattr(request.app.state, "store", None)
        state = await read_queue_state(store.redis if store else None, settings)
        return Response(generate_latest(scrape_registry([state])), media_type=CONTENT_TYPE_LATEST)


def release_process_metrics() -> None:
    """At shutdown: in multiprocess mode, this process's live gauges stop counting."""
    if directory := multiprocess_dir():
        mark_process_dead(os.getpid(), directory)  # type: ignore[no-untyped-call]
