"""`/batches`: submit many requests at once, follow them as one, stream their results in order."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from api import idempotency
from api.batch_inputs import InvalidBatch, read_batch
from api.batch_store import batch_idempotency
from api.deps import BatchStoreDep, LongPollDep, OwnerDep, ResourceId, SettingsDep, WaiterDep
from api.openapi import ERROR_RESPONSES
from api.waiting import EndOf
from shared.redis_state.batch import BatchView

router = APIRouter(prefix="/batches", tags=["batches"])

BatchId = ResourceId
# A batch's end is published on the tasks' channel under its id; woken, it is read again.
BATCH_END: EndOf[BatchView] = EndOf(lambda view: view.status.ended)


def _accepted(view: BatchView, replayed: bool = False) -> Response:
    headers = {"Location": view.status_url}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(
        view.model_dump_json(), status_code=202, headers=headers, media_type="application/json"
    )


@router.post(
    "",
    status_code=202,
    response_model=BatchView,
    responses=ERROR_RESPONSES,
    summary="Submit a batch of predictions (JSON or JSONL)",
)
async def create_batch(
    http: Request, settings: SettingsDep, store: BatchStoreDep, owner: OwnerDep
) -> Response:
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
    try:
        view = await store.create(batch, owner, claim)
    except idempotency.Replay as replay:
        return _accepted(await store.get(replay.task_id, owner), replayed=True)
    return _accepted(view)


@router.get("/{batch_id}", response_model=BatchView, responses=ERROR_RESPONSES)
async def get_batch(
    batch_id: BatchId,
    store: BatchStoreDep,
    waiter: WaiterDep,
    owner: OwnerDep,
    seconds: LongPollDep,
) -> BatchView:
    """Status, `request_counts` per task status, timestamps; `?wait=N` until the batch ends."""
    return await waiter.long_poll(batch_id, seconds, lambda: store.get(batch_id, owner), BATCH_END)


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
async def batch_results(
    batch_id: BatchId, store: BatchStoreDep, owner: OwnerDep
) -> StreamingResponse:
    """The results so far, streamed: at any time (unfinished items show their status)."""
    view = await store.get(batch_id, owner)
    return StreamingResponse(store.results(view), media_type="application/x-ndjson")


@router.delete("/{batch_id}", response_model=BatchView, responses=ERROR_RESPONSES)
async def cancel_batch(batch_id: BatchId, store: BatchStoreDep, owner: OwnerDep) -> BatchView:
    """Cancel the queued items (they never reach TorchServe); running ones finish. The batch is
    `canceling` until they have, then `canceled`; an ended batch answers 409."""
    return await store.cancel(batch_id, owner)
