"""The API's side of the task records: submit (record + message in one step), read, cancel.

Every write is one script of shared/redis_state. Reading a task can write too: a task that can
no longer end by itself (queued past its deadline, or running long after its worker was lost)
is settled by the read that finds it, hence `read_and_settle`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Protocol, TypeVar, cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from api.errors import queue_refuses_writes
from api.group_commit import Submit, SubmitGroups
from api.idempotency import IdempotencyClaim, Replay
from shared import tracing
from shared.backends import Target
from shared.celery_app import task_headers
from shared.errors import (
    DispatchError,
    InvalidRequest,
    QueueFull,
    TaskAlreadyFinished,
    TaskCanceled,
    TaskExpired,
    TaskNotFound,
    WorkerLost,
    redis_write_refusal,
)
from shared.logs import bind_task
from shared.models import PredictionRequest, TaskStatus, TaskView, call_fields
from shared.payloads import Payload
from shared.priorities import ALL_QUEUES, Priority, queue_of
from shared.redis_state.keys import parse_depth, queued_key, task_key
from shared.redis_state.outbox_scripts import RetryEvent
from shared.redis_state.record import NewTask, as_mapping, decode_record, recorded_operation
from shared.redis_state.task_scripts import CancelTask, SettleTask, SubmitTask, SubmitTasks
from shared.replica_wait import ReplicatedWrites, ReplicaWait
from shared.settings import Settings

# How long after its deadline a `running` task may still be waiting for redelivery before the
# API gives it up: the broker's visibility timeout plus this margin for the redelivered run.
ORPHAN_MARGIN = 60.0

T = TypeVar("T")


def new_task_id() -> str:
    return str(uuid.uuid4())


class SubmitObserver(Protocol):
    """Told of every accepted submit (api/metrics.py counts them by model, priority, backend)."""

    def submitted(self, model_name: str, priority: Priority, backend: str) -> None: ...


class ApiStore:
    """Task records as the API sees them; all writes are the scripts of shared/redis_state."""

    def __init__(
        self,
        client: aioredis.Redis,
        settings: Settings,
        *,
        observer: SubmitObserver | None = None,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        """`busy`: whether submits should linger to share a write (api/group_commit.py)."""
        self.redis = client
        self._settings = settings
        self._observer = observer
        # With replicas to wait for, the submit script answers once they hold its write.
        replicas = ReplicaWait.of(client, settings)
        writes = client
        if replicas.enabled:
            writes = ReplicatedWrites(client, replicas)
            tracing.instrument_redis(writes)  # its calls are spans like the client's
        self.groups = SubmitGroups(
            SubmitTasks(writes),
            max_depth=settings.max_queue_depth,
            ttl=settings.result_ttl,
            idempotency_ttl=settings.idempotency_ttl,
            max_tasks=settings.message_max_tasks,
            linger=settings.submit_linger_ms / 1000,
            busy=busy,
        )
        self._cancel = CancelTask(client)
        self._settle = SettleTask(client)
        self.retry_event = RetryEvent(client)

    async def submit(
        self,
        request: PredictionRequest,
        target: Target,
        owner: str,
        task_id: str,
        payload: Payload | None = None,
        idempotency: IdempotencyClaim | None = None,
    ) -> TaskView:
        """Record and enqueue one task, or raise QueueFull having written nothing (or
        WriteNotReplicated, having written it, when its replicas did not confirm it in time).

        Concurrent submits share one Redis call (api/group_commit.py).
        `payload`: bytes to send instead of the JSON body; above the claim-check size they are
        stored under their own key in the same script, and the message carries the reference.
        `idempotency`: the task is recorded under the key too, unless a live task is held there
        already: then Replay (same request) or IdempotencyKeyReused, having written nothing.
        """
        bind_task(task_id, request.model_name)  # the request's log lines from here on
        now = time.time()
        deadline = now + self.timeout_of(request)
        priority = request.priority or Priority.default
        ref, stored = payload.reference(task_id) if payload is not None else (None, None)
        call = call_fields(request, target, deadline, now, priority, ref)
        fields = NewTask(
            model_name=request.model_name,
            model_version=request.model_version,
            origin=target.origin,
            backend=target.backend,
            operation=recorded_operation(target),
            deadline=deadline,
            priority=priority,
            webhook=request.webhook,
            webhook_events=request.webhook_event_types() if request.webhook else (),
            stream=request.stream,
            retry_keep=self._settings.retry_keep_seconds,
            credentials=request.has_credentials,
        ).fields(now, owner)
        submit = Submit(
            new=SubmitTask(
                task_id=task_id,
                queue=queue_of(priority),  # the 429 limit applies per class
                fields=fields,
                payload=None if stored is None else bytes(stored),
                idempotency_key=idempotency.redis_key if idempotency else "",
                idempotency_record=idempotency.record(task_id) if idempotency else "",
            ),
            task={"id": task_id, "call": call, "headers": task_headers()},
        )
        accepted = await self.groups.submit(submit)
        if isinstance(accepted, str) and idempotency is not None:
            raise Replay(idempotency.held_task(accepted))
        if not accepted:
            raise QueueFull(
                f"{self._settings.max_queue_depth} {priority.value} tasks are already queued; "
                "retry later"
            )
        if self._observer is not None:
            self._observer.submitted(request.model_name, priority, target.backend)
        return decode_record(task_id, as_mapping(fields))

    def timeout_of(self, request: PredictionRequest) -> float:
        if request.timeout is None:
            return self._settings.dispatch_default_timeout
        if request.timeout > self._settings.dispatch_max_timeout:
            raise InvalidRequest(
                f"timeout: must be at most {self._settings.dispatch_max_timeout:g} seconds"
            )
        return request.timeout

    async def read_and_settle(self, task_id: str, owner: str) -> TaskView:
        """The task as its owner may see it; 404 for unknown ids and other owners' tasks.

        Not a pure read: a task that can no longer end by itself is ended here (task_settle),
        so nothing stays queued or running forever, and the view shows it ended.
        """
        fields = cast(dict[str, str], await self.redis.hgetall(task_key(task_id)))
        if not fields or fields.get("owner", "") != owner:
            raise TaskNotFound(f"no task {task_id!r}: it was never submitted or has expired")
        view = decode_record(task_id, fields)
        bind_task(task_id, view.model_name)
        settled = await self._settle_overdue(view)
        if settled is True:
            return await self.read_and_settle(task_id, owner)
        return settled or view

    async def _settle_overdue(self, view: TaskView) -> TaskView | bool:
        """End a task that can no longer end by itself, so nothing stays queued/running forever.

        True when it was ended in Redis; while Redis refuses writes, the view as it would be once
        ended (a read must not fail for that: the next read or the worker's START stores it).
        """
        now = time.time()
        deadline = view.deadline.timestamp()
        error: DispatchError
        if view.status is TaskStatus.queued and now > deadline:
            error = TaskExpired("the task's deadline passed before a worker could start it")
            new_status = TaskStatus.expired
        elif view.status is TaskStatus.running and now > (
            deadline + self._settings.visibility_timeout + ORPHAN_MARGIN
        ):
            error = WorkerLost("the task's worker was lost and the task was not redelivered")
            new_status = TaskStatus.failed
        else:
            return False
        try:
            settled = await self._settle(
                view.task_id,
                expected=view.status,
                new=new_status,
                now=now,
                error=error.body(view.task_id).model_dump_json(),
                ttl=self._settings.result_ttl,
            )
        except ResponseError as refused:
            if redis_write_refusal(refused) is None:
                raise
            return view.model_copy(
                update={
                    "status": new_status,
                    "finished_at": datetime.fromtimestamp(now, UTC),
                    "error": error.body(view.task_id),
                }
            )
        return settled

    async def cancel(self, task_id: str, owner: str) -> TaskView:
        """Cancel a queued task at once, flag a running one; 409 for a finished one."""
        view = await self.read_and_settle(task_id, owner)
        if view.status.terminal:  # CANCEL would answer `canceled` for a task canceled before
            raise TaskAlreadyFinished(
                f"task {task_id} already ended as {view.status.value}; there is nothing to cancel"
            )
        canceled = TaskCanceled("the task was canceled before a worker started it")
        stopped = TaskCanceled("the task was canceled while its output streamed; its call stopped")
        outcome = await _write(
            self._cancel(
                task_id,
                now=time.time(),
                ttl=self._settings.result_ttl,
                error=canceled.body(task_id).model_dump_json(),
                running_error=stopped.body(task_id).model_dump_json(),
            ),
            "the task was not canceled",
        )
        if outcome not in ("canceled", "cancel_requested"):
            raise TaskAlreadyFinished(
                f"task {task_id} already ended as {outcome!s}; there is nothing to cancel"
            )
        return await self.read_and_settle(view.task_id, owner)

    async def queue_depth(self) -> int:
        """Tasks waiting in every class's queue (the counters of shared/redis_state/keys.py)."""
        depths = await self.redis.mget([queued_key(queue) for queue in ALL_QUEUES])
        return sum(parse_depth(depth) for depth in depths)


async def _write(write: Awaitable[T], outcome: str) -> T:
    """Await a write script; 503 saying why when Redis refuses writes (OOM, read-only replica).

    Every script's first write is the one Redis can refuse (it checks memory at a script's first
    write and lets the rest through), so a refused script has written nothing.
    """
    try:
        return await write
    except ResponseError as error:
        reason = redis_write_refusal(error)
        if reason is None:
            raise
        raise queue_refuses_writes(reason, outcome) from error
