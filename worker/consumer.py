"""The prediction tasks: a message of 1..K tasks (worker/messages.py), and the one-task messages
enqueued before messages could carry several."""

from __future__ import annotations

import threading
from functools import cache
from typing import Any

from celery import signals

from shared import heap, tracing
from shared.celery_app import REQUEST_ID_HEADER, TASK_PREDICT, TASK_PREDICT_MANY
from shared.models import PredictionCall
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


@app.task(name=TASK_PREDICT, bind=True)  # type: ignore[untyped-decorator]
def predict(self: Any, call: dict[str, Any]) -> None:
    """A one-task message: its id is the task's, its headers the request's."""
    request = self.request
    headers = {
        key: value
        for key in (REQUEST_ID_HEADER, *tracing.CARRIER_KEYS)
        if (value := request.get(key)) is not None
    }
    entry = TaskEntry(request.id, PredictionCall.model_validate(call), headers)
    _runner(request.hostname).run([entry])
