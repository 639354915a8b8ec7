"""One Celery message, 1..K tasks: START them in one call, run them side by side, store together.

Celery's per-message machinery (the BRPOP, the late ack, the trace) costs more CPU than the
prediction it carries, so the API packs the tasks of one group commit into one message and a
batch packs its items (shared/celery_app.py). Per task nothing changes: it has its own record,
START verdict, deliveries count, deadline and outcome, and a redelivered message re-runs only the
tasks whose records have not ended (START skips the others).

`Runner.run`: the message's first task runs in the Celery pool's own thread (a lone task pays no
hand-off), the others on the process's `PriorityPool` (worker/pool.py). A task is STARTed when a
thread takes it, so one waiting for a thread is still `queued` (cancelable, expiring at its
deadline). STARTs and outcomes are group-committed across threads (worker/group_commit.py). The
message is acked only after every one of its outcomes is stored (the Celery task returns then),
so at-least-once holds per task.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared import tracing
from shared.celery_app import REQUEST_ID_HEADER
from shared.errors import DispatchError, WorkerLost
from shared.logs import task_context
from shared.models import PredictionCall
from shared.payloads import read_payload
from shared.priorities import Priority
from shared.redis_state.record import Outcome
from worker import task_metrics as metrics
from worker.group_commit import GroupCommit
from worker.pool import PriorityPool
from worker.store import StartVerdict, WorkerStore
from worker.torchserve import TorchServeClient

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


class Runner:
    """Runs messages' tasks for one worker process (one per process)."""

    def __init__(self, store: WorkerStore, client: TorchServeClient, threads: int) -> None:
        self.store = store
        self.client = client
        self.starts: GroupCommit[str, tuple[StartVerdict, int]] = GroupCommit(store.start)
        self.outcomes: GroupCommit[Outcome, bool] = GroupCommit(store.finish)
        self.pool = PriorityPool(threads)

    def run(self, entries: list[TaskEntry]) -> None:
        """Every task of one message, side by side; returns once each has ended or been skipped
        (then Celery acks the message). A task is STARTed only when a thread takes it: until
        then it is still `queued` (cancelable, counted in the queue's depth, expiring at its
        deadline)."""
        first, *others = entries
        futures = [
            self.pool.submit(entry.rank, functools.partial(self._run_one, entry))
            for entry in others
        ]
        failure: BaseException | None = None
        try:
            self._run_one(first)
        except BaseException as error:  # the others still end before the message is acked
            failure = error
        for future in futures:
            failure = failure or future.exception()
        if failure is not None:
            raise failure

    def _run_one(self, entry: TaskEntry) -> None:
        task_id, call = entry.task_id, entry.call
        # Its log lines carry the ids; its trace continues the API's (traceparent in the headers).
        with (
            task_context(task_id, call.model_name, entry.headers.get(REQUEST_ID_HEADER)),
            tracing.task_span(
                TASK_SPAN,
                entry.headers,
                {"dispatcher.task_id": task_id, "model": call.model_name},
            ),
        ):
            verdict, deliveries = self.starts.call(task_id)
            observed = metrics.TaskObservation(call, deliveries)
            if verdict is StartVerdict.too_many:
                log.warning("task %s given up after %d deliveries", task_id, deliveries - 1)
                lost = WorkerLost(f"the task's worker was lost {deliveries - 1} times")
                self.outcomes.call(Outcome.failed(task_id, lost))
                observed.finished("failed", WorkerLost.code)
            elif verdict is not StartVerdict.run:
                log.info("task %s skipped: %s", task_id, verdict.value)
                observed.skipped(missing=verdict is StartVerdict.missing)
            else:
                outcome, status, code = self._predict(task_id, call)
                self.outcomes.call(outcome)
                observed.finished(status, code)

    def _predict(self, task_id: str, call: PredictionCall) -> tuple[Outcome, str, str]:
        try:
            # A claim-checked payload is read only now: a redelivered copy of a finished task
            # (its key deleted) never gets here.
            payload = read_payload(self.store.redis, call.payload) if call.payload else None
            answer = self.client.predict_answer(call, payload)
        except DispatchError as error:
            log.info("task %s %r failed: %s (%d)", task_id, call, error.code, error.status)
            return Outcome.failed(task_id, error), "failed", error.code
        except Exception:
            log.exception("task %s %r crashed", task_id, call)
            crashed = DispatchError("the worker crashed running this task; see worker logs")
            return Outcome.failed(task_id, crashed), "failed", DispatchError.code
        return Outcome.succeeded(task_id, answer.value, answer.content_type), "succeeded", "ok"
