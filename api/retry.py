"""`POST /tasks/{task_id}/retry`: a task that failed, expired or was canceled, run again as a
new task with the same request and payload.

What is kept, and for how long. A task's request lives in its Celery message (its `call`: the
model, backend, operation, body or payload reference, stream flag, credentials), and the API
keeps a copy of each message (K.message, for worker/reconciler.py) and a claim-checked payload
under K.payload. Endings normally delete both; an ending failed, expired or canceled of a task
whose record has `retry_keep` (RETRY_KEEP_SECONDS, written at submit) keeps them that long
instead, at most as long as the record (lib.lua publish_record and close_task), so memory grows
with the failures of the last RETRY_KEEP_SECONDS only. Once gone, a retry is a 409
`retry_unavailable` that says so; the client still has its request and can submit it again.

Credentials are never kept: a request with its own `token`, `username` or `password` records
`credentials` instead of `retry_keep`, and the message copy that carries it is marked `secret`
and goes with its last open task (task_submit, batch_add_items, lib.lua close_task), since one
message carries up to MESSAGE_MAX_TASKS submits. Such a task's retry is a 409 that says why; a
task that only shared its message with one is a 409 once the copy is gone, like an old one.

The new task is a submit like any other: through the group commit (api/group_commit.py) and
task_submit, so the depth limit (429), the replica WAIT (503) and the console's figures apply to
it. Its deadline is as far from its submission as the first one's was (the same `timeout`, at
most DISPATCH_MAX_TIMEOUT); its webhook, events, priority and stream flag are the first
one's; X-Request-ID and the trace are the retry request's. A batch item may be retried:
its retry is a task of its own (no `batch_id`, no `custom_id`), so the batch and its counts stay
as they ended.

One retry per task. The submit carries an idempotency key derived from the retried task's id
(one no Idempotency-Key header can produce), so concurrent retries of one task create one task
in task_submit's atomic step and the others get that one; task_retry_link then writes
`retried_as` on the old record (HSETNX). Retrying it again answers 200 with that task, as it is
now: to run it once more, retry the retry. Should the API stop between the two steps, the next
retry finds the task held under the key and writes the missing link.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, cast

from fastapi import Response
from redis.client import NEVER_DECODE
from redis.exceptions import ResponseError

from api.errors import queue_refuses_writes
from api.group_commit import Submit
from api.store import ApiStore, new_task_id
from api.webhook_targets import check_webhook
from shared.backends import TORCHSERVE
from shared.celery_app import task_headers
from shared.errors import (
    QueueFull,
    RetryUnavailable,
    TaskNotFound,
    TaskNotRetryable,
    WriteNotReplicated,
    redis_write_refusal,
)
from shared.logs import bind_task
from shared.models import PredictionRequest, TaskStatus, TaskView
from shared.priorities import Priority, queue_of
from shared.redis_state.keys import idempotency_key, message_key, payload_key, task_key
from shared.redis_state.record import (
    NewTask,
    TaskField,
    as_mapping,
    decode_record,
    idempotency_record,
    parse_idempotency_record,
)
from shared.redis_state.task_scripts import LinkRetry, SubmitTask
from shared.settings import Settings

RETRYABLE = (TaskStatus.failed, TaskStatus.expired, TaskStatus.canceled)
# The idempotency record's fingerprint: the key alone tells retries apart (one per task).
FINGERPRINT = "retry"


@dataclass(frozen=True, slots=True)
class Retried:
    """The retry's answer: the task that retries, and whether this request created it."""

    view: TaskView
    created: bool

    def response(self) -> Response:
        """202 for a new task (as an async dispatch's, with its Location); 200 for the one a
        retry of this task had created already."""
        location = f"/tasks/{self.view.task_id}"
        return Response(
            self.view.model_dump_json(),
            status_code=202 if self.created else 200,
            headers={"Location": location},
            media_type="application/json",
        )


@dataclass(frozen=True, slots=True)
class _Kept:
    """What the ended task left for its retry: its record, its message entry, its payload."""

    fields: dict[str, str]
    call: dict[str, Any]
    payload: bytes | None


def retry_claim_key(owner: str, task_id: str) -> str:
    """The idempotency key of `task_id`'s retry. The \\x01 keeps it apart from every key an
    Idempotency-Key header makes (api/idempotency.py: printable ASCII only)."""
    return idempotency_key(hashlib.sha256(f"{owner}\0\x01retry\0{task_id}".encode()).hexdigest())


async def retry_task(store: ApiStore, settings: Settings, task_id: str, owner: str) -> Retried:
    """Retry `task_id` for `owner`: see the module's doc. 404 for an unknown task (or
    another owner's), 409 for one that cannot be retried, 429/503 as for any submit."""
    view = await store.read_and_settle(task_id, owner)  # settles one overdue: may expire it
    if view.retried_as is not None:
        return Retried(await _retry_of(store, view, owner), created=False)
    if view.status not in RETRYABLE:
        raise TaskNotRetryable(
            f"task {task_id} is {view.status.value}: only a failed, expired or canceled task "
            "can be retried"
            + (" (cancel it first, or wait for it to end)" if not view.status.terminal else "")
        )
    if settings.retry_keep_seconds == 0:
        raise RetryUnavailable(
            "retry is off on this server (RETRY_KEEP_SECONDS=0): no request is kept after its "
            "task ends; submit it again"
        )
    kept = await _kept(store, task_id, settings)
    return await _submit(store, settings, view, kept, owner)


async def _retry_of(store: ApiStore, view: TaskView, owner: str) -> TaskView:
    """The retry `view` has already, as it is now."""
    assert view.retried_as is not None
    try:
        return await store.read_and_settle(view.retried_as, owner)
    except TaskNotFound:
        raise RetryUnavailable(
            f"task {view.task_id} was retried as {view.retried_as}, whose record has expired"
        ) from None


async def _kept(store: ApiStore, task_id: str, settings: Settings) -> _Kept:
    """The record, message entry and payload the ended task kept; 409 when any is gone."""
    gone = RetryUnavailable(
        f"task {task_id}'s request is no longer kept (it is kept {settings.retry_keep_seconds} s "
        "after a task ends, RETRY_KEEP_SECONDS): submit it again"
    )
    fields = cast(dict[str, str], await store.redis.hgetall(task_key(task_id)))
    message = fields.get(TaskField.message.value)
    if fields.get(TaskField.credentials.value) == "1":
        raise RetryUnavailable(
            f"task {task_id}'s request carried per-request credentials (token, username or "
            "password), which are never kept after a task ends: submit it again with them"
        )
    if not message or TaskField.retry_keep.value not in fields:
        raise gone  # from before retries were kept, or submitted with RETRY_KEEP_SECONDS=0
    body = await store.redis.hget(message_key(message), "body")
    call = message_call(cast(str, body), task_id) if body else None
    if call is None:
        raise gone
    payload: bytes | None = None
    if isinstance(call.get("payload"), dict) and call["payload"].get("key"):
        client: Any = store.redis  # raw bytes: this client decodes replies to str otherwise
        raw = await client.execute_command("GET", payload_key(task_id), **{NEVER_DECODE: True})
        if raw is None:
            raise gone
        payload = bytes(raw)
    return _Kept(fields, call, payload)


def message_call(body: str, task_id: str) -> dict[str, Any] | None:
    """The `call` of `task_id` in a stored message (a kombu envelope, shared/celery_app.py);
    None when it does not carry that task. worker/reconciler.py reads its copies the same way
    (the API does not import worker code)."""
    try:
        _, kwargs, _ = json.loads(base64.b64decode(json.loads(body)["body"]))
        entries = kwargs.get("tasks") or ()
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    for entry in entries:
        if isinstance(entry, dict) and entry.get("id") == task_id:
            call = entry.get("call")
            return dict(call) if isinstance(call, dict) else None
    return None


async def _submit(
    store: ApiStore, settings: Settings, view: TaskView, kept: _Kept, owner: str
) -> Retried:
    """Records and enqueues the retry (task_submit), then links the two records."""
    fields, old_id = kept.fields, view.task_id
    webhook = fields.get(TaskField.webhook.value) or None
    events = tuple(e for e in fields.get(TaskField.webhook_events.value, "").split(",") if e)
    stream = fields.get(TaskField.stream.value) == "1"
    if webhook is not None:  # the allow-list may have changed since: 403 as for a submit
        request = PredictionRequest.model_validate(
            {"model_name": view.model_name, "webhook": webhook,
             "webhook_events": list(events) or None, "stream": stream}
        )  # fmt: skip
        await check_webhook(request, settings)
    now = time.time()
    length = float(fields[TaskField.deadline.value]) - float(fields[TaskField.created_at.value])
    deadline = now + min(length, settings.dispatch_max_timeout)
    priority = Priority(fields[TaskField.priority.value])
    new_id = new_task_id()
    bind_task(new_id, view.model_name)
    call = {**kept.call, "deadline": deadline, "submitted_at": now}
    if kept.payload is not None:
        call["payload"] = {**call["payload"], "key": payload_key(new_id)}
    new = NewTask(
        model_name=view.model_name,
        model_version=view.model_version,
        origin=fields[TaskField.origin.value],
        deadline=deadline,
        priority=priority,
        webhook=webhook,
        webhook_events=events,
        backend=fields.get(TaskField.backend.value) or TORCHSERVE,
        operation=view.operation,
        stream=stream,
        retry_keep=settings.retry_keep_seconds,
    )
    record = [*new.fields(now, owner), TaskField.retry_of.value, old_id]
    submit = Submit(
        new=SubmitTask(
            task_id=new_id,
            queue=queue_of(priority),
            fields=record,
            payload=kept.payload,
            idempotency_key=retry_claim_key(owner, old_id),
            idempotency_record=idempotency_record(FINGERPRINT, new_id),
        ),
        task={"id": new_id, "call": call, "headers": task_headers()},
    )
    try:
        accepted = await store.groups.submit(submit)
    except WriteNotReplicated:  # written, not confirmed by the replicas: link it all the same
        await _link(store, old_id, new_id)
        raise
    if accepted == 0:
        raise QueueFull(
            f"{settings.max_queue_depth} {priority.value} tasks are already queued; retry later"
        )
    if isinstance(accepted, str):  # a concurrent retry of this task created it first
        _, held = parse_idempotency_record(accepted)
        await _link(store, old_id, held)
        return Retried(await store.read_and_settle(held, owner), created=False)
    await _link(store, old_id, new_id)
    return Retried(decode_record(new_id, as_mapping(record)), created=True)


async def _link(store: ApiStore, old_id: str, new_id: str) -> str:
    """Writes `retried_as` on the old record (task_retry_link); 503 when Redis refuses it."""
    try:
        return await LinkRetry(store.redis)(old_id, new_id)
    except ResponseError as error:
        reason = redis_write_refusal(error)
        if reason is None:
            raise
        raise queue_refuses_writes(
            reason, f"task {new_id} was enqueued but not yet linked to {old_id}"
        ) from error
