"""`/tasks/{task_id}`: the state of a submitted task, long-polling, and cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from api.deps import OwnerDep, SettingsDep, StoreDep, WaiterDep
from api.routes.dispatch import ERROR_RESPONSES
from shared.models import TaskView

router = APIRouter(prefix="/tasks", tags=["tasks"])

TaskId = Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9\-]+$")]


@router.get("/{task_id}", response_model=TaskView, responses=ERROR_RESPONSES)
async def get_task(
    task_id: TaskId,
    settings: SettingsDep,
    store: StoreDep,
    waiter: WaiterDep,
    owner: OwnerDep,
    wait: Annotated[
        float, Query(ge=0, le=86_400, description="Long-poll: answer once terminal or after N s.")
    ] = 0,
) -> TaskView:
    """The task's status, timestamps, and `prediction_value` or `error` once it ended."""
    seconds = min(wait, settings.dispatch_max_wait)
    if seconds <= 0:
        return await store.get(task_id, owner)
    async with waiter.watch(task_id) as watch:  # before the read: an end in between is seen
        view = await store.get(task_id, owner)
        return await watch.until_terminal(view, seconds, lambda: store.get(task_id, owner))


@router.delete("/{task_id}", response_model=TaskView, responses=ERROR_RESPONSES)
async def cancel_task(task_id: TaskId, store: StoreDep, owner: OwnerDep) -> TaskView:
    """Cancel a queued task (it never reaches TorchServe); a running one gets `cancel_requested`
    and still stores its result; a finished one answers 409."""
    return await store.cancel(task_id, owner)
