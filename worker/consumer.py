"""The Celery task that consumes every prediction message: 1..K tasks each (worker/messages.py)."""

from __future__ import annotations

import threading
from functools import cache
from typing import Any

from celery import signals

from shared import heap, tracing
from shared.celery_app import TASK_PREDICT_MANY
from shared.settings import get_settings
from worker.app import app
from worker.messages import Runner, TaskEntry
from worker.store import WorkerStore
from worker.torchserve import TorchServeClient

# The worker's pool size (`-c`), read once it is set up: a message's extra tasks run on as many
# threads per process (worker/messages.py), so a worker calls TorchServe at most about twice that.
_concurrency = {"threads": 8}
_lock = threading.Lock()


@signals.celeryd_after_setup.connect  # type: ignore[untyped-decorator]
def _remember_concurrency(instance: Any = None, **_: Any) -> None:
    concurrency = getattr(instance, "concurrency", None)
    if isinstance(concurrency, int) and concurrency > 0:
        _concurrency["threads"] = concurrency


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
def _freeze_heap(**_: Any) -> None:
    # Start-up done (in the main process, and in each prefork child): what lives now lives until
    # exit; the cyclic collector need not walk it again (shared/heap.py).
    heap.freeze_startup_heap()


@cache
def _runner(worker_name: str) -> Runner:
    # Built on first use, so each prefork child gets its own connections and threads after the
    # fork; under the lock, so two pool threads never build two.
    with _lock:
        store = WorkerStore(get_settings(), worker_name=worker_name)
        tracing.instrument_redis(store.redis)
        return Runner(store, TorchServeClient(get_settings()), _concurrency["threads"])


@app.task(name=TASK_PREDICT_MANY, bind=True)  # type: ignore[untyped-decorator]
def predict_many(self: Any, tasks: list[dict[str, Any]]) -> None:
    """Run the message's tasks; those that already ended (a redelivered copy) are skipped."""
    _runner(self.request.hostname).run([TaskEntry.parse(task) for task in tasks])
