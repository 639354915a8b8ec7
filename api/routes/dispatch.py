"""`POST /dispatch_model`: enqueue a prediction, then wait for it as long as the client prefers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from api.deps import OwnerDep, SettingsDep, StoreDep, WaitDep, WaiterDep
from api.errors import error_response
from api.store import new_task_id
from api.targets import resolve_origin
from api.waiting import Read, Watch
from shared.errors import DispatchError, QueueUnavailable
from shared.models import Accepted, PredictionRequest, TaskError, TaskStatus, TaskView

router = APIRouter(tags=["dispatch"])

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": TaskError, "description": description}
    for status, description in {
        401: "API key missing or invalid",
        403: "TorchServe target not on the allow-list",
        404: "unknown model or version (or task)",
        413: "body over MAX_BODY_BYTES",
        422: "invalid request, or the model rejected the input",
        429: "queue full: retry after Retry-After seconds",
        502: "TorchServe failed",
        503: "TorchServe or the queue unavailable",
        504: "timed out or expired",
    }.items()
}


def task_response(view: TaskView) -> Response:
    """200 with the result, the error body with its status, or 202 with where to poll."""
    if view.status is TaskStatus.succeeded:
        # Serialized directly: FastAPI would validate the model a second time on the way out.
        return Response(view.model_dump_json(), media_type="application/json")
    if view.status.terminal:
        assert view.error is not None
        return JSONResponse(view.error.model_dump(exclude_none=True), status_code=view.error.status)
    location = f"/tasks/{view.task_id}"
    accepted = Accepted(task_id=view.task_id, status=view.status, status_url=location)
    return Response(
        accepted.model_dump_json(),
        status_code=202,
        headers={"Location": location},
        media_type="application/json",
    )


@router.post(
    "/dispatch_model",
    response_model=TaskView,
    responses={
        202: {"model": Accepted, "description": "not finished yet: poll status_url"},
        **ERROR_RESPONSES,
    },
    summary="Run a prediction on TorchServe, synchronously or not",
)
async def dispatch_model(
    request: PredictionRequest,
    settings: SettingsDep,
    store: StoreDep,
    waiter: WaiterDep,
    owner: OwnerDep,
    preference: WaitDep,
) -> Response:
    """Enqueue the prediction and wait up to the preferred time (default DISPATCH_DEFAULT_WAIT).

    Finished in time: 200 with `prediction_value`, or the error with its status. Otherwise 202
    with `Location: /tasks/{task_id}`. `Prefer: respond-async` (or `?wait=0`) answers at once.
    """
    origin = resolve_origin(request, settings)
    task_id = new_task_id()
    if preference.seconds > 0:
        # Watching before the task exists: even a result that comes back at once is seen.
        async with waiter.watch(task_id) as watch:
            view = await store.submit(request, origin, owner, task_id)
            result = await _wait(watch, view, preference.seconds, lambda: store.get(task_id, owner))
    else:
        result = task_response(await store.submit(request, origin, owner, task_id))
    if preference.applied:
        result.headers["Preference-Applied"] = preference.applied
    return result


async def _wait(watch: Watch, view: TaskView, seconds: float, read: Read) -> Response:
    try:
        return task_response(await watch.until_terminal(view, seconds, read))
    except RedisError:  # Redis lost mid-wait: the task itself is safe, so name it
        lost = QueueUnavailable(
            "the task queue (Redis) became unavailable while waiting; the task is kept: "
            f"poll /tasks/{view.task_id} in a few seconds"
        )
        return error_response(lost, view.task_id)
    except DispatchError as error:
        return error_response(error, view.task_id)
