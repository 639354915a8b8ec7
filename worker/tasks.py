"""The prediction task: one delivery = START the record, call TorchServe, store the outcome."""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from shared import tracing
from shared.celery_app import REQUEST_ID_HEADER, TASK_PREDICT
from shared.errors import DispatchError, WorkerLost
from shared.logs import task_context
from shared.models import PredictionCall
from shared.payloads import read_payload
from shared.settings import get_settings
from worker import metrics
from worker.app import app
from worker.store import StartVerdict, WorkerStore
from worker.torchserve import TorchServeClient

log = logging.getLogger(__name__)


@cache
def _store(worker_name: str) -> WorkerStore:
    # Built on first use, so each prefork child gets its own connections after the fork.
    store = WorkerStore(get_settings(), worker_name=worker_name)
    tracing.instrument_redis(store.redis)
    return store


@cache
def _client() -> TorchServeClient:
    return TorchServeClient(get_settings())


@app.task(name=TASK_PREDICT, bind=True)  # type: ignore[untyped-decorator]
def predict(self: Any, call: dict[str, Any]) -> None:
    """Run one prediction; redelivered copies of a finished task do nothing (idempotent)."""
    task_id: str = self.request.id
    request = self.request
    model = str(call.get("model_name"))
    # Its log lines carry the ids; its trace continues the API's (traceparent in the headers).
    with (
        task_context(task_id, model, request.get(REQUEST_ID_HEADER)),
        tracing.task_span(TASK_PREDICT, request, {"dispatcher.task_id": task_id, "model": model}),
    ):
        run_prediction(
            task_id, PredictionCall.model_validate(call), _store(request.hostname), _client()
        )


def run_prediction(
    task_id: str, call: PredictionCall, store: WorkerStore, client: TorchServeClient
) -> None:
    verdict, deliveries = store.start(task_id)
    observed = metrics.TaskObservation(call, deliveries)
    if verdict is StartVerdict.too_many:
        log.warning("task %s given up after %d deliveries", task_id, deliveries - 1)
        store.fail(task_id, WorkerLost(f"the task's worker was lost {deliveries - 1} times"))
        observed.finished("failed", WorkerLost.code)
        return
    if verdict is not StartVerdict.run:
        log.info("task %s skipped: %s", task_id, verdict.value)
        observed.skipped(missing=verdict is StartVerdict.missing)
        return
    try:
        # A claim-checked payload is read only now: a redelivered copy of a finished task (its
        # key deleted) never gets here.
        payload = read_payload(store.redis, call.payload) if call.payload else None
        answer = client.predict_answer(call, payload)
    except DispatchError as error:
        log.info("task %s %r failed: %s (%d)", task_id, call, error.code, error.status)
        store.fail(task_id, error)
        observed.finished("failed", error.code)
    except Exception:
        log.exception("task %s %r crashed", task_id, call)
        store.fail(task_id, DispatchError("the worker crashed running this task; see worker logs"))
        observed.finished("failed", DispatchError.code)
    else:
        store.succeed(task_id, answer.value, answer.content_type)
        observed.finished("succeeded")
