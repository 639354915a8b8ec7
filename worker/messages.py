"""One task of a message, on the engine's event loop: a slot, START, the call, the outcome.

Celery's per-message machinery costs more than the prediction it carries, so the API packs the
tasks of one group commit into one message and a batch packs its items (shared/celery_app.py).
Per task nothing changes: it has its own record, START verdict, deliveries count, deadline and
outcome, and a redelivered message re-runs only the tasks whose records have not ended (START
skips the others).

A task is STARTed only once it holds a slot (its model's and the process's, see
worker/slots.py): until then it is still `queued` (cancelable, counted in its queue's depth,
expiring at its deadline). STARTs and outcomes are group-committed across everything the loop
runs (worker/group_commit.py). The engine acks a message only after every one of its tasks has
stored its outcome or been skipped (worker/engine.py), so at-least-once holds per task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared import tracing
from shared.backends import TORCHSERVE
from shared.celery_app import REQUEST_ID_HEADER
from shared.errors import DispatchError, WorkerLost
from shared.logs import task_context
from shared.models import PredictionCall
from shared.priorities import Priority
from shared.redis_state.record import Outcome
from shared.redis_state.stream_scripts import AppendToStream, StreamLimits
from shared.settings import Settings
from worker import task_metrics as metrics
from worker.backends import Caller
from worker.group_commit import GroupCommit
from worker.slots import Slots
from worker.store import StartVerdict, WorkerStore
from worker.stream_writer import StreamWriter

log = logging.getLogger(__name__)

_RANK = {priority: rank for rank, priority in enumerate(Priority)}
# The name of each task's span (one per task, not per message: a trace follows one request).
TASK_SPAN = "dispatch.predict"


@dataclass(frozen=True, slots=True)
class TaskEntry:
    """One task of a message: its id, its call, and its request's id and trace context."""

    task_id: str
    call: PredictionCall
    headers: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> TaskEntry:
        return cls(raw["id"], PredictionCall.model_validate(raw["call"]), raw.get("headers") or {})

    @property
    def rank(self) -> int:
        return _RANK[self.call.priority]


def _nothing() -> None:
    pass


class TaskRunner:
    """Runs the tasks of every message one worker process holds (one per process, one loop)."""

    def __init__(self, settings: Settings, store: WorkerStore, client: Caller) -> None:
        self.store = store
        self.client = client
        self.starts: GroupCommit[str, tuple[StartVerdict, int]] = GroupCommit(store.start)
        self.outcomes: GroupCommit[Outcome, bool] = GroupCommit(store.finish)
        self.slots = Slots(settings.worker_max_in_flight)
        self._per_backend = settings.worker_max_calls_per_backend
        self._backends: dict[tuple[str, str, str], Slots] = {}
        self._append = AppendToStream(store.redis)  # a streamed task's outputs
        self._stream_limits = StreamLimits.of(settings)
        # False once the worker stops: a task still waiting for a slot is not started, and its
        # message stays unacknowledged (delivered again; START skips what did end).
        self.admitting = True

    def backend_slots(self, call: PredictionCall) -> Slots:
        """The slots of the call's model on its server: each model has its own workers and
        queue (TorchServe's workers and job queue, a vLLM's batch), so a slow model never holds
        the calls of a fast one. Keyed by backend, origin (`torchserve` may call allow-listed
        ones) and model; the cap is the backend's `max_calls`, else the setting's."""
        backend = self.client.backend(call)
        origin = call.origin if backend is None or backend.name == TORCHSERVE else backend.origin
        key = (call.backend, origin, call.model_name)
        slots = self._backends.get(key)
        if slots is None:
            cap = (backend.max_calls if backend else None) or self._per_backend
            slots = self._backends[key] = Slots(cap)
        return slots

    @property
    def in_flight(self) -> int:
        return self.slots.in_use

    async def run(self, entry: TaskEntry, has_slots: Callable[[], None] = _nothing) -> bool:
        """True once the task ended or was skipped; False when the worker stopped before it
        could start (its message must not be acked). `has_slots()` once it holds its slots."""
        # The model's slot first: waiting for a slow model holds none of the process's.
        async with (
            self.backend_slots(entry.call).hold(entry.rank),
            self.slots.hold(entry.rank),
        ):
            has_slots()
            if not self.admitting:
                return False
            await self._run_one(entry)
        return True

    async def _run_one(self, entry: TaskEntry) -> None:
        task_id, call = entry.task_id, entry.call
        # Its log lines carry the ids; its trace continues the API's (traceparent in the headers).
        with (
            task_context(
                task_id, call.model_name, entry.headers.get(REQUEST_ID_HEADER), call.backend
            ),
            tracing.task_span(
                TASK_SPAN,
                entry.headers,
                {
                    "dispatcher.task_id": task_id,
                    "model": call.model_name,
                    "dispatcher.backend": call.backend,
                },
            ),
        ):
            verdict, deliveries = await self.starts.call(task_id)
            observed = metrics.TaskObservation(call, deliveries)
            if verdict is StartVerdict.too_many:
                log.warning("task %s given up after %d deliveries", task_id, deliveries - 1)
                lost = WorkerLost(f"the task's worker was lost {deliveries - 1} times")
                await self.outcomes.call(Outcome.failed(task_id, lost))
                observed.finished("failed", WorkerLost.code)
            elif verdict is not StartVerdict.run:
                log.info("task %s skipped: %s", task_id, verdict.value)
                observed.skipped(missing=verdict is StartVerdict.missing)
            else:
                outcome, status, code = await self._predict(task_id, call, deliveries)
                await self.outcomes.call(outcome)
                observed.finished(status, code)

    async def _predict(
        self, task_id: str, call: PredictionCall, deliveries: int
    ) -> tuple[Outcome, str, str]:
        try:
            # A claim-checked payload is read only now: a redelivered copy of a finished task
            # (its key deleted) never gets here.
            payload = await self.store.payload(call.payload) if call.payload else None
            # A streamed task's outputs go to its stream as they come; its ending (error or
            # done) is written with its outcome, by the script that stores it (lib.lua).
            writer = None
            if call.stream:
                writer = StreamWriter(self._append, task_id, deliveries, self._stream_limits)
                await writer.begin()
            answer = await self.client.predict_answer(call, payload, writer)
        except DispatchError as error:
            log.info("task %s %r failed: %s (%d)", task_id, call, error.code, error.status)
            return Outcome.failed(task_id, error), "failed", error.code
        except Exception:
            log.exception("task %s %r crashed", task_id, call)
            crashed = DispatchError("the worker crashed running this task; see worker logs")
            return Outcome.failed(task_id, crashed), "failed", DispatchError.code
        return Outcome.succeeded(task_id, answer.value, answer.content_type), "succeeded", "ok"
