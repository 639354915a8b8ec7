"""The worker's Prometheus metrics, served by each worker on WORKER_METRICS_PORT (0: off).

worker/messages.py reports each delivery's outcome (`TaskObservation`), worker/backends/caller.py
each attempt to call a backend (`backend_request`) and each retry (`count_retry`),
worker/reconciler.py each task it enqueues again (`count_reconciled`). Every call
runs in the worker's main process (its engine), which serves them. Each series has a `backend`
label (the configured backend's name) beside its `model` label.

`dispatcher_backend_request_duration_seconds` and `dispatcher_backend_retries_total` are every
backend's; the TorchServe-only names they replace (`dispatcher_torchserve_*`) are still reported
for the calls to TorchServe backends, with their old labels, so dashboards and alerts written
against them keep working.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.signals import worker_ready, worker_shutdown
from prometheus_client import Counter, Histogram, start_http_server

from shared.backends import Backend, Protocol
from shared.errors import DispatchError, ModelNotFound
from shared.models import PredictionCall
from shared.prometheus import (
    LATENCY_BUCKETS,
    UNKNOWN_MODEL,
    ModelLabels,
    scrape_registry,
)
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

TASKS_FINISHED = Counter(
    "dispatcher_tasks_finished",
    "Task deliveries by outcome: status succeeded/failed/expired/skipped, code the error code "
    "(ok on success; duplicate/missing for a skipped copy).",
    ["backend", "model", "status", "code"],
)
QUEUE_WAIT = Histogram(
    "dispatcher_task_queue_wait_seconds",
    "Submission to the start of the run (s), by priority class.",
    ["backend", "model", "priority"],
    buckets=LATENCY_BUCKETS,
)
TASK_RUN = Histogram(
    "dispatcher_task_run_seconds",
    "Start of the run to its end, retries included (s).",
    ["backend", "model"],
    buckets=LATENCY_BUCKETS,
)
TASK_TOTAL = Histogram(
    "dispatcher_task_total_seconds",
    "Submission to the end of the run (s), by priority class.",
    ["backend", "model", "priority"],
    buckets=LATENCY_BUCKETS,
)
BACKEND_DURATION = Histogram(
    "dispatcher_backend_request_duration_seconds",
    "One attempt to call a backend (s); outcome is ok or the attempt's error code.",
    ["backend", "model", "outcome"],
    buckets=LATENCY_BUCKETS,
)
BACKEND_RETRIES = Counter(
    "dispatcher_backend_retries",
    "Backend attempts retried, by the code of the error that caused the retry.",
    ["backend", "model", "code"],
)
TORCHSERVE_DURATION = Histogram(
    "dispatcher_torchserve_request_duration_seconds",
    "One TorchServe attempt (s); outcome is ok or the attempt's error code. Superseded by "
    "dispatcher_backend_request_duration_seconds (every backend).",
    ["model", "outcome"],
    buckets=LATENCY_BUCKETS,
)
TORCHSERVE_RETRIES = Counter(
    "dispatcher_torchserve_retries",
    "TorchServe attempts retried, by the code of the error that caused the retry. Superseded "
    "by dispatcher_backend_retries_total (every backend).",
    ["model", "code"],
)
REDELIVERIES = Counter(
    "dispatcher_redeliveries",
    "Deliveries of a task after its first (its worker was lost), counted when they start.",
    ["backend", "model"],
)

RECONCILED = Counter(
    "dispatcher_tasks_reconciled",
    "Tasks enqueued again by the reconciler (worker/reconciler.py): accepted, then found in no "
    "queue and held by no live worker, by priority class.",
    ["priority"],
)

_models = ModelLabels()
# Backends are configured, so few; a message naming one this worker lacks still gets a label.
_backends = ModelLabels(limit=64)


def model_label(model: str, code: str = "ok") -> str:
    """The model's label; a model its server does not have never takes one of the bounded slots."""
    return UNKNOWN_MODEL if code == ModelNotFound.code else _models(model)


class TaskObservation:
    """One delivery of a task, from START to its outcome; `TaskRunner._run_one` reports it once."""

    def __init__(self, call: PredictionCall, deliveries: int) -> None:
        self.backend = _backends(call.backend)
        self.model = call.model_name
        self.submitted_at = call.submitted_at
        self.priority = call.priority.value
        self.started_at = time.time()
        self.deliveries = deliveries

    def finished(self, status: str, code: str = "ok") -> None:
        now = time.time()
        backend, model = self.backend, model_label(self.model, code)
        TASKS_FINISHED.labels(backend, model, status, code).inc()
        if self.deliveries > 1:
            REDELIVERIES.labels(backend, model).inc()
        TASK_RUN.labels(backend, model).observe(now - self.started_at)
        waited = max(0.0, self.started_at - self.submitted_at)
        QUEUE_WAIT.labels(backend, model, self.priority).observe(waited)
        total = max(0.0, now - self.submitted_at)
        TASK_TOTAL.labels(backend, model, self.priority).observe(total)

    def skipped(self, missing: bool = False) -> None:
        """START ran nothing. Its `deliveries` tell why (shared/redis_state/lua/task_start.lua): 0
        for a copy of a task that ended already, or whose record is gone (`missing`); 1 for a task
        that expired in the queue; more for a redelivered task whose deadline passed while its
        worker was lost."""
        if self.deliveries == 0:
            code = "missing" if missing else "duplicate"
            TASKS_FINISHED.labels(self.backend, model_label(self.model), "skipped", code).inc()
        elif self.deliveries == 1:
            self.finished("expired", "expired")
        else:
            self.finished("failed", "deadline_exceeded")


@contextmanager
def backend_request(backend: Backend, model: str) -> Iterator[None]:
    """Time one attempt; its outcome is `ok` or the code of the error it raised."""
    started = time.perf_counter()
    outcome = "internal_error"
    try:
        yield
        outcome = "ok"
    except DispatchError as error:
        outcome = error.code
        raise
    finally:
        elapsed = time.perf_counter() - started
        label = model_label(model, outcome)
        BACKEND_DURATION.labels(_backends(backend.name), label, outcome).observe(elapsed)
        if backend.protocol is Protocol.torchserve:
            TORCHSERVE_DURATION.labels(label, outcome).observe(elapsed)


def count_retry(backend: Backend, model: str, code: str) -> None:
    label = model_label(model, code)
    BACKEND_RETRIES.labels(_backends(backend.name), label, code).inc()
    if backend.protocol is Protocol.torchserve:
        TORCHSERVE_RETRIES.labels(label, code).inc()


def count_reconciled(priority: str) -> None:
    """One task enqueued again; `priority` is a record's, hence one of the three classes."""
    RECONCILED.labels(priority).inc()


# --- serving (main process) -------------------------------------------------------------------


def serve(settings: Settings) -> Any:
    """Start the metrics HTTP server; None when disabled or the port is taken (logged)."""
    if not settings.worker_metrics_port:
        return None
    try:
        server, _ = start_http_server(
            settings.worker_metrics_port, settings.worker_metrics_host, scrape_registry()
        )
    except OSError as error:
        log.warning(
            "worker metrics not served: %s:%d is unavailable (%s); set WORKER_METRICS_PORT to a "
            "free port, or 0 to turn them off",
            settings.worker_metrics_host,
            settings.worker_metrics_port,
            error.strerror,
        )
        return None
    log.info(
        "metrics on http://%s:%d/metrics",
        settings.worker_metrics_host,
        settings.worker_metrics_port,
    )
    return server


_running: dict[str, Any] = {}


def start_metrics(sender: Any = None, **_: Any) -> None:
    _running["server"] = serve(get_settings())


def stop_metrics(**_: Any) -> None:
    if server := _running.pop("server", None):
        server.shutdown()


def install() -> None:
    """Serve this worker's metrics once it is ready.

    Called by worker/app.py, not at import: other Celery apps (the webhook consumer) import the
    `worker` package too, and must not take the metrics port.
    """
    worker_ready.connect(start_metrics, weak=False, dispatch_uid="dispatcher-metrics-start")
    worker_shutdown.connect(stop_metrics, weak=False, dispatch_uid="dispatcher-metrics-stop")
