"""Group commit of submits: concurrent submits of one API process share one Redis script call.

A submit costs a round trip and a script run in Redis, and its Celery message costs a worker
more than the prediction (docs/BENCHMARKS.md). So submits that arrive while another group is
being written wait for that write to end, then go together: one task_submit call
(shared/redis_state/lua/task_submit.lua) records all of them, and each priority class's tasks
share one message. An idle API sends a lone submit at once, in the caller's own task: latency at
low load does not grow. Under load, the group is whatever arrived during one round trip (at most
`max_tasks`). A round trip is short next to the time between submits of a few hundred requests a
second, so while the API is busy (`busy()`: many sync callers waiting in this process) a submit
that finds no write in flight lingers `linger` seconds (SUBMIT_LINGER_MS) for others to join it:
waiting callers already spend tens of milliseconds in the queue, and a message of several tasks
costs a worker far less per task than one each.

Per task nothing is shared but the round trip: its own depth check, record, idempotency key and
outcome (a 429 or a replay for one task is not one for the others). With replicas to wait for,
the group's call ends with WAIT in the same pipeline (shared/replica_wait.py: ReplicatedScript),
and a group its replicas did not confirm in time is a 503 for each of its submits.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from api.errors import queue_refuses_writes
from shared.celery_app import encode_message
from shared.errors import redis_write_refusal
from shared.redis_state.task_scripts import SubmitTask, SubmitTasks


@dataclass(slots=True)
class Submit:
    """One task to record and enqueue: what task_submit records, and its message entry."""

    new: SubmitTask
    task: dict[str, Any]  # {"id", "call", "headers"}: its entry in the Celery message
    result: asyncio.Future[int | str] = field(init=False)


class SubmitGroups:
    """Writes submits in groups; `submit` answers 1 (recorded), 0 (queue full) or the record
    held under its idempotency key, or raises what the write raised."""

    def __init__(self, script: SubmitTasks, max_depth: int, ttl: int, idempotency_ttl: int,
                 max_tasks: int, linger: float = 0.0,
                 busy: Callable[[], bool] | None = None) -> None:  # fmt: skip
        self._script = script
        self._linger = linger
        self._busy = busy or (lambda: False)  # see the module's doc
        self._timer: asyncio.TimerHandle | None = None
        self._max_depth, self._ttl, self._idempotency_ttl = max_depth, ttl, idempotency_ttl
        self._max_tasks = max_tasks
        self._pending: list[Submit] = []
        self._writing = False
        self._writers: set[asyncio.Task[None]] = set()

    async def submit(self, submit: Submit) -> int | str:
        submit.result = asyncio.get_running_loop().create_future()
        self._pending.append(submit)
        if not self._writing:
            self._writing = True
            if self._linger > 0 and self._busy():  # let others join: one write after `linger`
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self._linger, self._write_in_background)
            else:  # idle: this caller writes its own submit now
                await self._write_group()
        elif self._timer is not None and len(self._pending) >= self._max_tasks:
            self._timer.cancel()  # a full group does not wait out the linger
            self._write_in_background()
        return await submit.result

    def _write_in_background(self) -> None:
        self._timer = None
        writer = asyncio.create_task(self._write_group(), name="submit-group")
        self._writers.add(writer)  # a reference, so it is not collected mid-write
        writer.add_done_callback(self._writers.discard)

    async def _write_group(self) -> None:
        group, self._pending = (
            self._pending[: self._max_tasks],
            self._pending[self._max_tasks :],
        )
        try:
            results = await self._write(group)
        except asyncio.CancelledError:
            # Only a caller writing its own lone submit is ever canceled (its client went away):
            # the task may or may not have been written, as with any request cut off mid-way.
            for submit in group:
                submit.result.cancel()
        except Exception as error:
            for submit in group:
                if not submit.result.done():
                    submit.result.set_exception(error)
        else:
            for submit, result in zip(group, results, strict=True):
                if not submit.result.done():
                    submit.result.set_result(result)
        finally:
            if self._pending:  # arrived meanwhile: the next group goes now, in the background
                self._write_in_background()
            else:
                self._writing = False

    async def _write(self, group: list[Submit]) -> list[int | str]:
        by_queue: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        for submit in group:
            by_queue[submit.new.queue].append(submit.task)
        messages = {queue: encode_message(tasks, queue=queue) for queue, tasks in by_queue.items()}
        try:
            return await self._script(
                [submit.new for submit in group],
                messages,
                max_depth=self._max_depth,
                ttl=self._ttl,
                idempotency_ttl=self._idempotency_ttl,
            )
        except ResponseError as error:
            reason = redis_write_refusal(error)
            if reason is None:
                raise
            raise queue_refuses_writes(reason, "nothing was enqueued") from error
