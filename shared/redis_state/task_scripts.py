"""Typed calls of the task scripts (lua/task_*.lua): the only code that knows their arguments.

The API submits, cancels and settles; the workers' engines start and finish (all asyncio).
Each class registers its script on the client it is given and turns typed values into KEYS and
ARGV, and the script's reply into Python values. Redis refusing a write (OOM, a read-only
replica) is the callers' concern: they know what to tell their own caller.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.models import TaskStatus
from shared.redis_state.keys import LAST_FINISHED_KEY, task_key
from shared.redis_state.loader import AsyncWrapper, text
from shared.redis_state.record import Outcome

# task_submit's ARGV before the messages: max depth, two TTLs, the tasks, the messages' indices.
_SUBMIT_HEAD = 5


@dataclass(frozen=True, slots=True)
class SubmitTask:
    """One task of a task_submit call."""

    task_id: str
    queue: str
    fields: list[str]  # field, value, ... of its record (record.NewTask.fields)
    payload: bytes | None = None  # claim-checked payload, stored under its own key
    idempotency_key: str = ""  # '' for none
    idempotency_record: str = ""  # record.idempotency_record


class SubmitTasks(AsyncWrapper):
    """task_submit: records tasks and pushes their messages, each task on its own terms."""

    name = "task_submit"

    async def __call__(
        self,
        tasks: Sequence[SubmitTask],
        messages: Mapping[str, str],
        *,
        max_depth: int,
        ttl: int,
        idempotency_ttl: int,
    ) -> list[int | str]:
        """`messages`: the Celery message of each queue's tasks. One result per task: 1
        (recorded), 0 (its class is at `max_depth`) or the idempotency record held for it."""
        indices = {queue: _SUBMIT_HEAD + 1 + n for n, queue in enumerate(messages)}
        payloads: list[bytes] = []
        entries: list[list[Any]] = []
        for task in tasks:
            position = 0
            if task.payload is not None:
                payloads.append(task.payload)
                position = _SUBMIT_HEAD + len(messages) + len(payloads)
            entries.append(
                [task.task_id, task.queue, task.fields, position,
                 task.idempotency_key, task.idempotency_record]
            )  # fmt: skip
        args: list[Any] = [
            max_depth,
            ttl,
            idempotency_ttl,
            json.dumps(entries),
            json.dumps(indices),
            *messages.values(),
            *payloads,
        ]
        return [r if isinstance(r, int) else text(r) for r in await self._script(args=args)]


class CancelTask(AsyncWrapper):
    """task_cancel: cancels a queued (or running streamed) task, flags a running one."""

    name = "task_cancel"

    async def __call__(
        self, task_id: str, *, now: float, ttl: int, error: str, running_error: str = ""
    ) -> str:
        """`error`: the cancel's error body (JSON, with the task id); `running_error`: the one
        of a running streamed task (`error` when empty). The status after the call:
        'canceled', 'cancel_requested', the terminal one it had, or 'missing'."""
        args: list[str | float] = [now, ttl, task_id, error, running_error or error]
        return text(await self._script(keys=[task_key(task_id)], args=args))


class SettleTask(AsyncWrapper):
    """task_settle: ends a task that outlived its bounds, unless it moved on meanwhile."""

    name = "task_settle"

    async def __call__(
        self,
        task_id: str,
        *,
        expected: TaskStatus,
        new: TaskStatus,
        now: float,
        error: str,
        ttl: int,
    ) -> bool:
        """True when it ended here; False when its status was no longer `expected`."""
        args = [expected.value, new.value, now, error, ttl, task_id]
        return bool(await self._script(keys=[task_key(task_id)], args=args))


@dataclass(frozen=True, slots=True)
class StartTerms:
    """What task_start needs besides the task ids: the same for every delivery of a worker."""

    max_deliveries: int
    ttl: int
    worker: str
    expired_error: str  # JSON without task_id
    overran_error: str  # JSON without task_id

    def args(self, task_ids: Sequence[str], now: float) -> list[str | float]:
        return [
            now,
            self.max_deliveries,
            self.ttl,
            self.worker,
            self.expired_error,
            self.overran_error,
            *task_ids,
        ]


def _verdicts(flat: Sequence[Any]) -> list[tuple[str, int]]:
    """(verdict, deliveries) per task, in order: 'run', 'missing', 'too_many', 'expired' or the
    terminal status of a task that had ended."""
    return [(text(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


def _finish_call(outcomes: Sequence[Outcome], now: float, ttl: int) -> dict[str, Any]:
    entries = []
    values: list[str] = []
    for outcome in outcomes:
        values.append(outcome.value)
        # ARGV: now, ttl, the entries, then the values (Lua counts from 1).
        entries.append(
            [outcome.task_id, outcome.status.value, outcome.field, 3 + len(values),
             outcome.extra]
        )  # fmt: skip
    return {"keys": [LAST_FINISHED_KEY], "args": [now, ttl, json.dumps(entries), *values]}


class StartTasks(AsyncWrapper):
    """task_start: one delivery of the tasks of any number of messages (the worker's engine)."""

    name = "task_start"

    async def __call__(
        self, task_ids: Sequence[str], terms: StartTerms, now: float
    ) -> list[tuple[str, int]]:
        return _verdicts(await self._script(args=terms.args(task_ids, now)))


class FinishTasks(AsyncWrapper):
    """task_finish: stores outcomes; a task that had ended keeps its first one."""

    name = "task_finish"

    async def __call__(self, outcomes: Sequence[Outcome], *, now: float, ttl: int) -> list[bool]:
        """False for each task that had ended already (nothing written for it)."""
        return [bool(flag) for flag in await self._script(**_finish_call(outcomes, now, ttl))]


class LinkRetry(AsyncWrapper):
    """task_retry_link: writes a retried task's `retried_as`, once (api/retry.py)."""

    name = "task_retry_link"

    async def __call__(self, task_id: str, retry_id: str) -> str:
        """The id the task is linked to after the call: `retry_id`, the retry it was linked to
        before, or '' when its record is gone."""
        return text(await self._script(keys=[task_key(task_id)], args=[task_id, retry_id]))
