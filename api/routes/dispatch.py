"""`POST /dispatch_model`: enqueue a prediction, then wait for it as long as the client prefers."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from api import idempotency, sse
from api.backend_inputs import check_backend_input, check_stream
from api.deps import DIRECT_DEPENDENCIES, DirectRoute, resolve
from api.errors import error_response
from api.inputs import read_request
from api.openapi import ERROR_RESPONSES
from api.routes.streams import StreamReader, event_stream, wants_events
from api.store import ApiStore, new_task_id
from api.targets import resolve_target
from api.waiting import Read, ResultWaiter, Watch
from api.webhook_targets import check_webhook
from shared.backends import Protocol
from shared.errors import DispatchError, QueueUnavailable
from shared.models import Accepted, TaskStatus, TaskView
from shared.priorities import Priority

# The hot path, the one DirectRoute: see api/deps.py. Its body and the headers it reads are
# documented by api/openapi.py.
router = APIRouter(tags=["dispatch"], route_class=DirectRoute, dependencies=DIRECT_DEPENDENCIES)


def task_response(view: TaskView, stream: bool = False) -> Response:
    """200 with the result, the error body with its status, or 202 with where to poll (and,
    for `stream: true`, where to read the output as it comes)."""
    if view.status is TaskStatus.succeeded:
        # Serialized directly: FastAPI would validate the model a second time on the way out.
        return Response(view.model_dump_json(), media_type="application/json")
    if view.status.terminal:
        assert view.error is not None
        return JSONResponse(view.error.model_dump(exclude_none=True), status_code=view.error.status)
    location = f"/tasks/{view.task_id}"
    accepted = Accepted(
        task_id=view.task_id,
        status=view.status,
        status_url=location,
        stream_url=f"{location}/stream" if stream else None,
    )
    return Response(
        accepted.model_dump_json(exclude_none=True),
        status_code=202,
        headers={"Location": location},
        media_type="application/json",
    )


@router.post(
    "/dispatch_model",
    response_model=TaskView,
    responses={
        200: {
            "description": "finished in time: the task; or, for `stream: true` with a wait and "
            "`Accept: text/event-stream`, its events as GET /tasks/{task_id}/stream sends them",
            "content": {sse.MEDIA_TYPE: {"schema": sse.EVENT_SCHEMA}},
        },
        202: {"model": Accepted, "description": "not finished yet: poll status_url"},
        **ERROR_RESPONSES,
    },
    summary="Run a prediction on a model server, synchronously or not",
)
# The original service's path: answered here, not redirected (clients rarely re-POST a 307).
@router.post("/dispatch_model/", include_in_schema=False)
async def dispatch_model(http: Request) -> Response:
    """Enqueue the prediction and wait up to the preferred time (default DISPATCH_DEFAULT_WAIT).

    Finished in time: 200 with `prediction_value`, or the error with its status. Otherwise 202
    with `Location: /tasks/{task_id}` (and `stream_url` for `stream: true`). `Prefer:
    respond-async` (or `?wait=0`) answers at once. `stream: true` with a wait and `Accept:
    text/event-stream` answers with the task's Server-Sent Events instead.
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
    target = resolve_target(request, settings)
    if request.stream:
        check_stream(target)
    if target.protocol is not Protocol.torchserve:  # TorchServe takes any body: nothing to check
        probe = http.app.state.probe
        await check_backend_input(request, target, payload is not None, probe.require_bytes)
    await check_webhook(request, settings)
    claim = await idempotency.claim(key, owner, request, target, payload) if key else None
    task_id = new_task_id()
    # A streamed request that waits and accepts SSE gets the stream itself as its answer.
    events = (
        StreamReader(http.app.state.hub, waiter, store, owner)
        if request.stream and preference.seconds > 0 and wants_events(http.headers.get("accept"))
        else None
    )
    try:
        if events is not None:
            view = await store.submit(request, target, owner, task_id, payload, claim)
            result = await event_stream(events, view, None)
        elif preference.seconds > 0:
            # Watching before the task exists: even a result that comes back at once is seen.
            async with waiter.watch(task_id) as watch:
                view = await store.submit(request, target, owner, task_id, payload, claim)
                result = await _wait(
                    watch,
                    view,
                    preference.seconds,
                    lambda: store.read_and_settle(task_id, owner),
                    request.stream,
                )
        else:
            result = task_response(
                await store.submit(request, target, owner, task_id, payload, claim),
                request.stream,
            )
    except idempotency.Replay as replay:
        if events is not None:
            result = await event_stream(
                events, await store.read_and_settle(replay.task_id, owner), None
            )
        else:
            result = await _replay(
                replay.task_id, store, waiter, owner, preference.seconds, request.stream
            )
        result.headers["Idempotent-Replayed"] = "true"
    if preference.applied:
        result.headers["Preference-Applied"] = preference.applied
    return result


async def _replay(
    task_id: str, store: ApiStore, waiter: ResultWaiter, owner: str, seconds: float, stream: bool
) -> Response:
    """What a fresh request with this wait preference would get for the held task now.

    The first read is not wrapped: if it fails (the record expired since the submit script saw
    it, Redis lost) the app's handlers answer, as for any read; only the wait names the task."""
    if seconds <= 0:
        return task_response(await store.read_and_settle(task_id, owner), stream)
    async with waiter.watch(task_id) as watch:
        view = await store.read_and_settle(task_id, owner)
        return await _wait(
            watch, view, seconds, lambda: store.read_and_settle(task_id, owner), stream
        )


async def _wait(
    watch: Watch, view: TaskView, seconds: float, read: Read[TaskView], stream: bool
) -> Response:
    """The task's answer once it ended or `seconds` passed; an error naming it if the wait fails."""
    task_id = view.task_id
    try:
        return task_response(await watch.until_terminal(view, seconds, read), stream)
    except RedisError:  # Redis lost mid-wait: the task itself is safe, so name it
        lost = QueueUnavailable(
            "the task queue (Redis) became unavailable while waiting; the task is kept: "
            f"poll /tasks/{task_id} in a few seconds"
        )
        return error_response(lost, task_id)
    except DispatchError as error:
        return error_response(error, task_id)
