"""`/batches`: submit many requests at once, follow them as one, stream their results in order."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from api import idempotency
from api.batch_inputs import JSONL_TYPES, InvalidBatch, read_batch
from api.batch_store import BatchStore, batch_idempotency
from api.deps import OwnerDep, SettingsDep, WaiterDep
from api.routes.dispatch import ERROR_RESPONSES
from api.waiting import RECHECK_SECONDS
from shared.redis_state.batch import BatchView

router = APIRouter(prefix="/batches", tags=["batches"])

BatchId = Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9\-]+$")]


def _store(http: Request) -> BatchStore:
    store: BatchStore = http.app.state.batches
    return store


def _accepted(view: BatchView, replayed: bool = False) -> Response:
    headers = {"Location": view.status_url}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(
        view.model_dump_json(), status_code=202, headers=headers, media_type="application/json"
    )


_ITEM = {
    "type": "object",
    "required": ["custom_id", "model_name"],
    "description": "A JSON dispatch (model_name, model_version, input or data, timeout, priority "
    "[default batch], ...) plus custom_id, unique in the batch.",
}
_BODY_DOC: dict[str, Any] = {
    "parameters": [
        {
            "name": idempotency.HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "string", "maxLength": 257},
            "description": "Retry safely: the same key and body answer with the same batch.",
        },
        *(
            {
                "name": name,
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": "JSONL form only: the batch's " + name + ".",
            }
            for name in ("webhook", "webhook_events")
        ),
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["requests"],
                    "properties": {
                        "requests": {"type": "array", "items": _ITEM},
                        "webhook": {"type": "string"},
                        "webhook_events": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "batch.completed (the default) and task.* events, "
                            "which every item then sends",
                        },
                    },
                }
            },
            **{media: {"schema": {"type": "string"}} for media in JSONL_TYPES[:2]},
        },
    },
}


@router.post(
    "",
    status_code=202,
    response_model=BatchView,
    responses=ERROR_RESPONSES,
    summary="Submit a batch of predictions (JSON or JSONL)",
    openapi_extra=_BODY_DOC,
)
async def create_batch(http: Request, settings: SettingsDep, owner: OwnerDep) -> Response:
    """Validate every request (one 422 lists every bad one), then enqueue them all at once.

    202 with the batch and `Location: /batches/{id}`. Items run in the `batch` priority class
    unless they set `priority`; each is a task of its own (`/tasks/{batch_id}-{index}`).
    """
    key = idempotency.parse_key(http.headers.getlist(idempotency.HEADER))
    try:
        batch = await read_batch(http, settings)
    except InvalidBatch as invalid:
        body = invalid.body().model_dump(exclude_none=True)
        body["errors"] = [error.model_dump(exclude_none=True) for error in invalid.errors]
        return JSONResponse(body, status_code=invalid.status)
    claim = batch_idempotency(key, owner, batch.fingerprint) if key else None
    store = _store(http)
    try:
        view = await store.create(batch, owner, claim)
    except idempotency.Replay as replay:
        return _accepted(await store.get(replay.task_id, owner), replayed=True)
    return _accepted(view)


@router.get("/{batch_id}", response_model=BatchView, responses=ERROR_RESPONSES)
async def get_batch(
    batch_id: BatchId,
    http: Request,
    settings: SettingsDep,
    waiter: WaiterDep,
    owner: OwnerDep,
    wait: Annotated[
        float, Query(ge=0, le=86_400, description="Long-poll: answer once ended or after N s.")
    ] = 0,
) -> BatchView:
    """Status, `request_counts` per task status, timestamps; `?wait=N` until the batch ends."""
    store = _store(http)
    seconds = min(wait, settings.dispatch_max_wait)
    if seconds <= 0:
        return await store.get(batch_id, owner)
    # The batch's end is published on the tasks' channel under its id: registered before the
    # read, so an end in between still wakes this request.
    async with waiter.watch(batch_id) as watch:
        view = await store.get(batch_id, owner)
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while not view.status.ended and (remaining := until - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, RECHECK_SECONDS)):
                    await watch.woken.wait()
            watch.woken.clear()
            view = await store.get(batch_id, owner)
        return view


@router.get(
    "/{batch_id}/results",
    responses={
        200: {
            "description": "JSONL, one line per request in input order: custom_id, task_id, "
            "status, and prediction_value or error once it ended",
            "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
        },
        **ERROR_RESPONSES,
    },
    response_class=StreamingResponse,
)
async def batch_results(batch_id: BatchId, http: Request, owner: OwnerDep) -> StreamingResponse:
    """The results so far, streamed: at any time (unfinished items show their status)."""
    store = _store(http)
    view = await store.get(batch_id, owner)
    return StreamingResponse(store.results(view), media_type="application/x-ndjson")


@router.delete("/{batch_id}", response_model=BatchView, responses=ERROR_RESPONSES)
async def cancel_batch(batch_id: BatchId, http: Request, owner: OwnerDep) -> BatchView:
    """Cancel the queued items (they never reach TorchServe); running ones finish. The batch is
    `canceling` until they have, then `canceled`; an ended batch answers 409."""
    return await _store(http).cancel(batch_id, owner)
