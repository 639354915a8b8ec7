"""What the API's and the workers' Prometheus metrics share: label bounds, buckets, registries.

Metric names are fixed by the README's "Operating it" table (dashboards and alerts rely on them).
Labels stay bounded: models beyond `MAX_MODEL_LABELS` distinct names share one label value, so a
client sending random model names cannot grow the series without limit.

Several processes on one machine (`uvicorn --workers N`, Celery's prefork pool) report through
prometheus-client's multiprocess mode: set PROMETHEUS_MULTIPROC_DIR to an empty directory before
the processes start, and every process writes its samples there for the one that is scraped.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, disable_created_metrics
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Distinct model names one process labels separately; later ones are counted as OTHER_MODEL.
MAX_MODEL_LABELS = 200
OTHER_MODEL = "_other"
# A model TorchServe does not have: never its own label, or typos would fill the slots.
UNKNOWN_MODEL = "_unknown"
# The priority label of tasks that carry none (enqueued before priority classes existed).
DEFAULT_PRIORITY = "default"


# Seconds. Sync requests block up to DISPATCH_MAX_WAIT and tasks run up to DISPATCH_MAX_TIMEOUT,
# so the buckets reach far beyond the millisecond ones a quick prediction lands in.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip


# The `_created` series would double every scrape, and nothing here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class ModelLabels:
    """Maps model names to label values: the first MAX_MODEL_LABELS as they are, then OTHER_MODEL.

    Lock-free on the hot path: a known name is one dict lookup.
    """

    def __init__(self, limit: int = MAX_MODEL_LABELS) -> None:
        self._limit = limit
        self._known: dict[str, str] = {}
        self._lock = threading.Lock()

    def __call__(self, model: str) -> str:
        label = self._known.get(model)
        if label is not None:
            return label
        with self._lock:
            if model not in self._known:
                self._known[model] = model if len(self._known) < self._limit else OTHER_MODEL
            return self._known[model]


def scrape_registry(extra: Iterable[Collector] = ()) -> CollectorRegistry:
    """A registry for one scrape: this process's metrics (or, in multiprocess mode, every
    process's, read from PROMETHEUS_MULTIPROC_DIR) plus `extra` collectors."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir():
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(REGISTRY)  # a registry is a collector of everything it holds
    for collector in extra:
        registry.register(collector)
    return registry
