"""`/tasks/{task_id}`: the state of a submitted task, long-polling, cancel and retry."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Response

from api import retry
from api.deps import LongPollDep, OwnerDep, ResourceId, SettingsDep, StoreDep, WaiterDep
from api.openapi import ERROR_RESPONSES
from shared.errors import ResultNotAvailable
from shared.models import TaskStatus, TaskView
from shared.redis_state.record import answer_bytes

router = APIRouter(prefix="/tasks", tags=["tasks"])

TaskId = ResourceId


@router.get("/{task_id}", response_model=TaskView, responses=ERROR_RESPONSES)
async def get_task(
    task_id: TaskId,
    store: StoreDep,
    waiter: WaiterDep,
    owner: OwnerDep,
    seconds: LongPollDep,
) -> TaskView:
    """The task's status, timestamps, and `prediction_value` or `error` once it ended."""
    return await waiter.long_poll_task(
        task_id, seconds, lambda: store.read_and_settle(task_id, owner)
    )


@router.get(
    "/{task_id}/result",
    responses={
        200: {
            "description": "The answer itself, with its content type (JSON as application/json)",
            "content": {"application/json": {}, "*/*": {"schema": {"type": "string"}}},
        },
        **ERROR_RESPONSES,
    },
    response_class=Response,
)
async def get_result(task_id: TaskId, store: StoreDep, owner: OwnerDep) -> Response:
    """The answer of a succeeded task, raw (an image as its bytes); 409 until it succeeded."""
    view = await store.read_and_settle(task_id, owner)
    if view.status is not TaskStatus.succeeded:
        raise ResultNotAvailable(
            f"task {task_id} is {view.status.value}: only a succeeded task has a result"
            + ("; wait with GET /tasks/{id}?wait=N" if not view.status.terminal else "")
        )
    return raw_answer(view.prediction_value, view.prediction_content_type)


def raw_answer(value: Any, content_type: str | None) -> Response:
    """The answer as TorchServe sent it, from what the worker stored (shared/redis_state)."""
    if content_type is None:  # JSON
        return Response(json.dumps(value), media_type="application/json")
    return Response(answer_bytes(value, content_type), headers={"Content-Type": content_type})


@router.delete("/{task_id}", response_model=TaskView, responses=ERROR_RESPONSES)
async def cancel_task(task_id: TaskId, store: StoreDep, owner: OwnerDep) -> TaskView:
    """Cancel a queued task (it never reaches its model server); a running one gets
    `cancel_requested` and still stores its result, except a streamed one (`stream: true`),
    which is canceled at once: its stream ends with `done` and its worker closes the call to the
    model server at the next chunk. A finished one answers 409."""
    return await store.cancel(task_id, owner)


@router.post(
    "/{task_id}/retry",
    response_model=TaskView,
    status_code=202,
    responses={
        200: {"model": TaskView, "description": "retried before: the task that retries it"},
        202: {"model": TaskView, "description": "a new task, queued: poll its Location"},
        **ERROR_RESPONSES,
    },
)
async def retry_task(
    task_id: TaskId, store: StoreDep, settings: SettingsDep, owner: OwnerDep
) -> Response:
    """Run a failed, expired or canceled task again as a new task: the same request and
    payload, its `retry_of` naming this one, this one's `retried_as` naming it. 202 with the
    new task; 200 with that same task when this one was retried before; 409 when it cannot be
    retried (not failed, expired or canceled; or its request is no longer kept: they are kept
    RETRY_KEEP_SECONDS after it ended). A batch item's retry is a task of its own."""
    return (await retry.retry_task(store, settings, task_id, owner)).response()
