"""`POST /batches` bodies: read, then validated completely before anything is enqueued.

Two forms: JSON `{"requests": [...], "webhook", "webhook_events"}`, or JSONL
(`application/x-ndjson`, `application/jsonl`: one request object per line, the batch's webhook
fields in the query string). Each request is a JSON dispatch (`model_name`, `input` or `data`,
`timeout`, `priority`, ...) plus a `custom_id`, unique in the batch. Every bad item is collected,
by index and custom_id, into one 422: a client fixes its file once instead of learning one
mistake per upload. Models TorchServe does not have are not checked here: that is the model's
answer, per item, later.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, get_args

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from api.backend_inputs import BytesCheck, check_body, check_stream
from api.errors import describe_validation
from api.inputs import decode_data_uri, fallback_type, too_large
from api.targets import resolve_target
from api.webhook_targets import check_webhook
from shared.backends import Protocol, Target
from shared.errors import DispatchError, InvalidRequest
from shared.models import PredictionRequest, WebhookEventType
from shared.payloads import DEFAULT_MEDIA_TYPE, Part, Payload
from shared.priorities import Priority
from shared.redis_state.batch import BATCH_EVENTS
from shared.settings import Settings

JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines")
MAX_CUSTOM_ID = 256
# Item errors listed in the 422 (all are counted; a file of 10,000 bad lines needs no 10,000).
MAX_LISTED_ERRORS = 1000
FORBIDDEN = 403
TASK_EVENTS = frozenset(get_args(WebhookEventType))
ALL_EVENTS = TASK_EVENTS | frozenset(BATCH_EVENTS)


class ItemError(BaseModel):
    """One bad request of a batch: where it is and what to fix."""

    index: int
    custom_id: str | None = None
    code: str
    msg: str


class InvalidBatch(InvalidRequest):
    """422 listing every bad item (api/routes/batches.py renders `errors` into the body).

    403 instead when every bad item is well formed but refused by an allow-list (a TorchServe
    target, a webhook URL): what each of them answers as a dispatch of its own.
    """

    def __init__(self, msg: str, errors: list[ItemError], refused: bool = False) -> None:
        super().__init__(msg, status=FORBIDDEN if refused else None)
        self.errors = errors
        if refused:
            self.code = errors[0].code  # type: ignore[misc]  # the refusal's own code


@dataclass
class BatchItem:
    custom_id: str
    request: PredictionRequest
    target: Target
    payload: Payload | None
    priority: Priority


@dataclass
class BatchInput:
    items: list[BatchItem]
    webhook: str | None
    webhook_events: tuple[str, ...]
    fingerprint: str  # of the body and the batch's webhook settings, for Idempotency-Key
    task_events: tuple[str, ...] = field(default=())  # task.* events every item sends to webhook


async def read_batch(http: Request, settings: Settings) -> BatchInput:
    """The batch, validated; 422 (InvalidBatch) listing every bad item, nothing enqueued."""
    media = http.headers.get("content-type", "").partition(";")[0].strip().lower()
    body = await http.body()  # bounded by MAX_BATCH_BYTES in api/limits.py
    if media == "application/json":
        raw, webhook, events = _from_json(body)
    elif media in JSONL_TYPES:
        raw = _from_jsonl(body)
        webhook = http.query_params.get("webhook")
        listed = http.query_params.get("webhook_events")
        events = [e.strip() for e in listed.split(",") if e.strip()] if listed else None
    else:
        raise HTTPException(
            415,
            'send the batch as application/json ({"requests": [...]}) or as JSONL '
            "(application/x-ndjson or application/jsonl, one request per line)",
        )
    if not raw:
        raise InvalidRequest("requests: a batch needs at least one request")
    if len(raw) > settings.batch_max_requests:
        raise InvalidRequest(
            f"requests: {len(raw)} requests, more than BATCH_MAX_REQUESTS "
            f"({settings.batch_max_requests}); split the batch"
        )
    chosen = await _batch_webhook(webhook, events, settings)
    items = await _validate_items(
        raw,
        settings,
        check_sizes=len(body) > settings.max_body_bytes,
        takes_bytes=http.app.state.probe.require_bytes,
    )
    digest = hashlib.sha256(media.encode() + b"\0" + body)
    digest.update(json.dumps([webhook, chosen]).encode())
    task_events = tuple(e for e in chosen if e in TASK_EVENTS)
    return BatchInput(items, webhook, chosen, digest.hexdigest(), task_events)


def _from_json(body: bytes) -> tuple[list[Any], str | None, list[str] | None]:
    try:
        document = json.loads(body)
    except ValueError:
        raise InvalidRequest('the body is not valid JSON: send {"requests": [...]}') from None
    if not isinstance(document, dict) or not isinstance(document.get("requests"), list):
        raise InvalidRequest("requests: send a JSON object with a list of requests under requests")
    webhook, events = document.get("webhook"), document.get("webhook_events")
    if webhook is not None and not isinstance(webhook, str):
        raise InvalidRequest("webhook: must be a URL string")
    if events is not None and not (
        isinstance(events, list) and all(isinstance(e, str) for e in events)
    ):
        raise InvalidRequest("webhook_events: must be a list of event names")
    return document["requests"], webhook, events


def _from_jsonl(body: bytes) -> list[Any]:
    items: list[Any] = []
    bad: list[ItemError] = []
    for line in body.splitlines():
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except ValueError:
            bad.append(ItemError(index=len(items), code="invalid_request", msg="not valid JSON"))
            items.append(None)
    if bad:
        raise InvalidBatch(_summary(bad, len(items)), bad[:MAX_LISTED_ERRORS])
    return items


async def _batch_webhook(
    url: str | None, events: list[str] | None, settings: Settings
) -> tuple[str, ...]:
    if url is None:
        if events:
            raise InvalidRequest("webhook_events: only with webhook (the URL to send them to)")
        return ()
    unknown = sorted(set(events or ()) - ALL_EVENTS)
    if unknown or events == []:
        raise InvalidRequest(
            f"webhook_events: {', '.join(unknown) or 'empty'}; choose from "
            f"{', '.join(sorted(ALL_EVENTS))}"
        )
    # The allow-list check of a dispatch's webhook (403 webhook_not_allowed), for this URL.
    await check_webhook(PredictionRequest.model_construct(model_name="-", webhook=url), settings)
    return tuple(sorted(set(events or BATCH_EVENTS)))


async def _validate_items(
    raw: list[Any], settings: Settings, *, check_sizes: bool, takes_bytes: BytesCheck
) -> list[BatchItem]:
    items: list[BatchItem] = []
    errors: list[ItemError] = []
    refused = True  # every error so far is an allow-list's 403
    seen: set[str] = set()
    webhooks_checked: dict[str, DispatchError | None] = {}
    for index, entry in enumerate(raw):
        custom_id = entry.get("custom_id") if isinstance(entry, dict) else None
        shown = custom_id if isinstance(custom_id, str) else None
        try:
            item = _item(entry, custom_id, seen, settings, check_sizes)
            if item.payload is not None and item.target.protocol is Protocol.oip:
                await takes_bytes(item.target)  # cached: one question per backend, not per item
            if item.request.webhook is not None or item.request.webhook_events is not None:
                await _check_item_webhook(item.request, settings, webhooks_checked)
        except DispatchError as error:
            errors.append(ItemError(index=index, custom_id=shown, code=error.code, msg=error.msg))
            refused = refused and error.status == FORBIDDEN
            continue
        items.append(item)
    if errors:
        raise InvalidBatch(_summary(errors, len(raw)), errors[:MAX_LISTED_ERRORS], refused)
    return items


def _item(
    entry: Any,
    custom_id: Any,
    seen: set[str],
    settings: Settings,
    check_sizes: bool,
) -> BatchItem:
    if not isinstance(entry, dict):
        raise InvalidRequest("each request must be a JSON object with custom_id and model_name")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
        raise InvalidRequest(
            f"custom_id: required, a string of 1-{MAX_CUSTOM_ID} characters naming the request "
            "in the results"
        )
    if custom_id in seen:
        raise InvalidRequest(f"custom_id: {custom_id[:80]!r} is used by an earlier request")
    seen.add(custom_id)
    try:
        request = PredictionRequest.model_validate(entry)
    except ValidationError as error:
        raise InvalidRequest(
            describe_validation(error.errors(include_url=False, include_input=False))
        ) from None
    if request.timeout is not None and request.timeout > settings.dispatch_max_timeout:
        raise InvalidRequest(f"timeout: must be at most {settings.dispatch_max_timeout:g} seconds")
    payload = None
    if request.data is not None:
        data, media_type = decode_data_uri(request.data, settings.max_body_bytes)
        request.data = None
        content_type = media_type or fallback_type(request) or DEFAULT_MEDIA_TYPE
        payload = Payload(data, [Part(content_type=content_type, size=len(data))], False)
    elif check_sizes:  # only a body over MAX_BODY_BYTES can hold an item over it
        size = len(
            json.dumps(request.input if request.input is not None else request.torchserve_body())
        )
        if size > settings.max_body_bytes:
            raise too_large(size, settings.max_body_bytes, "input")
    target = resolve_target(request, settings)
    check_body(request, target, has_bytes=payload is not None)
    if request.stream:
        check_stream(target)
    return BatchItem(custom_id, request, target, payload, request.priority or Priority.batch)


async def _check_item_webhook(
    request: PredictionRequest, settings: Settings, checked: dict[str, DispatchError | None]
) -> None:
    """check_webhook once per distinct URL (it may resolve the host), not once per item."""
    if request.webhook is None:
        await check_webhook(request, settings)  # webhook_events without webhook: 422
        return
    if request.webhook not in checked:
        try:
            await check_webhook(request, settings)
            checked[request.webhook] = None
        except DispatchError as error:
            checked[request.webhook] = error
    if (refused := checked[request.webhook]) is not None:
        raise refused


def _summary(errors: list[ItemError], total: int) -> str:
    first = errors[0]
    where = f"#{first.index}" + (f" ({first.custom_id!r})" if first.custom_id else "")
    more = f"; the first, {where}: {first.msg}" if errors else ""
    return (
        f"{len(errors)} of {total} requests are invalid; nothing was enqueued. Fix each one "
        f"listed under errors (index, custom_id){more}"
    )
