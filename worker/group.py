"""One Celery message, 1..K tasks: START them in one call, run them side by side, store together.

Celery's per-message machinery (the BRPOP, the late ack, the trace) costs more CPU than the
prediction it carries, so the API packs the tasks of one group commit into one message and a
batch packs its items (shared/celery_app.py). Per task nothing changes: it has its own record,
START verdict, deliveries count, deadline and outcome, and a redelivered message re-runs only the
tasks whose records have not ended (START skips the others).

- `Runner.run`: the message's first task runs in the Celery pool's own thread (a lone task pays
  no hand-off), the others on `PriorityPool`. A task is STARTed when a thread takes it, so one
  waiting for a thread is still `queued` (cancelable, expiring at its deadline).
- `PriorityPool`: this process's threads for the extra tasks, as many as the worker's
  concurrency, taking interactive tasks first: a batch message's items never queue ahead of a
  sync caller's task inside the worker.
- `GroupCommit`: STARTs and outcomes are group-committed, like submits in the API: the first
  thread writes at once; threads that arrive while that write is in flight go together in the
  next one (one START_MANY or FINISH_MANY call), written by one of them. The message is acked
  only after every one of its outcomes is stored (the Celery task returns then), so
  at-least-once holds per task.
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from shared import tracing
from shared.celery_app import REQUEST_ID_HEADER, TASK_PREDICT
from shared.errors import DispatchError, WorkerLost
from shared.logs import task_context
from shared.models import PredictionCall
from shared.payloads import read_payload
from shared.priorities import Priority
from worker import metrics
from worker.store import Outcome, StartVerdict, WorkerStore
from worker.torchserve import TorchServeClient

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
_RANK = {priority: rank for rank, priority in enumerate(Priority)}


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
        return _RANK[self.call.priority or Priority.default]


class PriorityPool:
    """Daemon threads running callables, lowest rank first (FIFO within a rank)."""

    def __init__(self, threads: int) -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Callable[[], Any], Future[Any]]] = (
            queue.PriorityQueue()
        )
        self._order = itertools.count()
        for n in range(max(1, threads)):
            threading.Thread(target=self._work, name=f"dispatch-group-{n}", daemon=True).start()

    def submit(self, rank: int, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((rank, next(self._order), fn, future))
        return future

    def _work(self) -> None:
        while True:
            _, _, fn, future = self._queue.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as error:  # handed to the waiting Celery thread
                    future.set_exception(error)


class _Slot(Generic[T, R]):
    """One item waiting in a GroupCommit: written, failed, or handed the lead."""

    def __init__(self, item: T) -> None:
        self.item = item
        self.woken = threading.Event()
        self.done = False
        self.value: R | None = None
        self.error: BaseException | None = None

    def settle(self, value: R | None = None, error: BaseException | None = None) -> None:
        self.value, self.error, self.done = value, error, True
        self.woken.set()

    def result(self) -> R:
        if self.error is not None:
            raise self.error
        return cast(R, self.value)


class GroupCommit(Generic[T, R]):
    """Group commit across this process's threads: `call(item)` writes the item with every other
    item pending at that moment in one `write(items) -> results` call. The first caller writes at
    once; callers that arrive meanwhile go together in the next call, led by one of them."""

    def __init__(self, write: Callable[[list[T]], Sequence[R]]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._pending: list[_Slot[T, R]] = []
        self._writing = False

    def call(self, item: T) -> R:
        slot: _Slot[T, R] = _Slot(item)
        with self._lock:
            self._pending.append(slot)
            lead, self._writing = not self._writing, True
        if not lead:
            slot.woken.wait()
            if slot.done:
                return slot.result()
        self._write_round()  # led by this thread: the round includes its own item
        return slot.result()

    def _write_round(self) -> None:
        with self._lock:
            group, self._pending = self._pending, []
        try:
            results = self._write([slot.item for slot in group])
        except BaseException as error:
            for slot in group:
                slot.settle(error=error)
        else:
            for slot, value in zip(group, results, strict=True):
                slot.settle(value)
        finally:
            with self._lock:
                if self._pending:  # arrived meanwhile: the first of them leads the next round
                    self._pending[0].woken.set()
                else:
                    self._writing = False


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
                TASK_PREDICT,
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
