"""`POST /dispatch_model`: enqueue a prediction, then wait for it as long as the client prefers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from api import idempotency
from api.deps import WAIT_PARAMETERS, DirectRoute, resolve
from api.errors import error_response
from api.inputs import read_request
from api.store import ApiStore, new_task_id
from api.targets import resolve_origin
from api.waiting import Read, ResultWaiter, Watch
from api.webhook_targets import check_webhook
from shared.errors import DispatchError, QueueUnavailable
from shared.models import Accepted, PredictionRequest, TaskError, TaskStatus, TaskView
from shared.priorities import Priority

router = APIRouter(tags=["dispatch"], route_class=DirectRoute)  # the hot path: see api/deps.py

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": TaskError, "description": description}
    for status, description in {
        400: "malformed Idempotency-Key header",
        401: "API key missing or invalid",
        403: "TorchServe target or webhook URL not on the allow-list",
        404: "unknown model or version (or task)",
        413: "body over MAX_BODY_BYTES",
        422: "invalid request, Idempotency-Key reused for another request, or the model "
        "rejected the input",
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


_RAW_TYPES = (
    "application/octet-stream",
    "image/*",
    "audio/*",
    "video/*",
    "application/pdf",
    "text/plain",
)
_FORM_FIELDS = (
    "model_name",
    "model_version",
    "timeout",
    "priority",
    "input_media_type",
    "webhook",
    "webhook_events",
)


def _request_body_doc() -> dict[str, Any]:
    """The four forms for /docs: the body is read by api/inputs.py, not declared as a model."""
    schema = PredictionRequest.model_json_schema()
    form_fields = {name: schema["properties"][name] for name in _FORM_FIELDS}
    binary = {"type": "string", "format": "binary"}
    multipart = {
        "type": "object",
        "required": ["model_name", "data"],
        "properties": {
            **form_fields,
            "data": {
                **binary,
                "description": "The payload; more file parts (any names) are forwarded too.",
            },
        },
    }
    raw = {**binary, "description": "The payload as it is; the fields go in the query string."}
    query = [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": form_fields[name],
            "description": "Raw-body form only (any Content-Type other than JSON or multipart)"
            + ("; required there." if name == "model_name" else "."),
        }
        for name in _FORM_FIELDS
    ]
    key = {
        "name": idempotency.HEADER,
        "in": "header",
        "required": False,
        "schema": {"type": "string", "maxLength": 257},
        "description": "Retry safely: the same key and request answer with the same task "
        "(`Idempotent-Replayed: true`), never a second run; another request with it is 422.",
    }
    return {
        # What the route's parameters would declare (api/deps.py reads them without FastAPI's
        # dependency solving), then the forms' own.
        "parameters": [*WAIT_PARAMETERS, key, *query],
        "requestBody": {
            "required": True,
            "description": "JSON (`input`, or `data` as a data URI), multipart/form-data with "
            "file parts, or a raw body of any other Content-Type (fields in the query string).",
            "content": {
                "application/json": {"schema": schema},
                "multipart/form-data": {"schema": multipart},
                **{media: {"schema": raw} for media in _RAW_TYPES},
            },
        },
    }


@router.post(
    "/dispatch_model",
    response_model=TaskView,
    responses={
        202: {"model": Accepted, "description": "not finished yet: poll status_url"},
        **ERROR_RESPONSES,
    },
    summary="Run a prediction on TorchServe, synchronously or not",
    openapi_extra=_request_body_doc(),
)
# The original service's path: answered here, not redirected (clients rarely re-POST a 307).
@router.post("/dispatch_model/", include_in_schema=False)
async def dispatch_model(http: Request) -> Response:
    """Enqueue the prediction and wait up to the preferred time (default DISPATCH_DEFAULT_WAIT).

    Finished in time: 200 with `prediction_value`, or the error with its status. Otherwise 202
    with `Location: /tasks/{task_id}`. `Prefer: respond-async` (or `?wait=0`) answers at once.
    The body is JSON, multipart/form-data, or raw bytes with the fields in the query string.
    """
    deps = resolve(http)
    settings, store, waiter, owner, preference = (
        deps.settings,
        deps.store,
        deps.waiter,
        deps.owner,
        deps.preference,
    )
    key = idempotency.parse_key(http.headers.getlist(idempotency.HEADER))
    request, payload = await read_request(http, settings.max_body_bytes)
    if request.priority is None:  # a caller who waits is interactive; one who polls is not
        request.priority = Priority.interactive if preference.seconds > 0 else Priority.default
    origin = resolve_origin(request, settings)
    await check_webhook(request, settings)
    claim = await idempotency.claim(key, owner, request, origin, payload) if key else None
    task_id = new_task_id()
    try:
        if preference.seconds > 0:
            # Watching before the task exists: even a result that comes back at once is seen.
            async with waiter.watch(task_id) as watch:
                view = await store.submit(request, origin, owner, task_id, payload, claim)
                result = await _wait(
                    watch, view, preference.seconds, lambda: store.read_and_settle(task_id, owner)
                )
        else:
            result = task_response(
                await store.submit(request, origin, owner, task_id, payload, claim)
            )
    except idempotency.Replay as replay:
        result = await _replay(replay.task_id, store, waiter, owner, preference.seconds)
        result.headers["Idempotent-Replayed"] = "true"
    if preference.applied:
        result.headers["Preference-Applied"] = preference.applied
    return result


async def _replay(
    task_id: str, store: ApiStore, waiter: ResultWaiter, owner: str, seconds: float
) -> Response:
    """What a fresh request with this wait preference would get for the held task now."""
    if seconds <= 0:
        return task_response(await store.read_and_settle(task_id, owner))
    async with waiter.watch(task_id) as watch:
        view = await store.read_and_settle(task_id, owner)
        return await _wait(watch, view, seconds, lambda: store.read_and_settle(task_id, owner))


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
