"""The task record: its fields, how Python writes and reads them, and how answers are stored.

Celery's result backend is not used: an unknown id would read as PENDING, results would need one
subscription per task, and state changes could race. Instead each task is the hash
`K.task .. <id>` (keys.py), every transition is one script of lua/ (atomic against the API's
cancel and a redelivered copy), and every ending publishes the record on FINISHED_CHANNEL.

The scripts write the fields named in `TaskField`; Python writes a record's first fields
(`NewTask`, for the single submit and each batch item) and the values of its ending
(`Outcome`, for task_finish), and reads it back with `decode_record`. A stored answer is JSON, or
(with `result_type`) text or a `data:` URI as the worker received it: `Outcome.succeeded`
writes it, `answer_bytes` gives back the bytes TorchServe sent.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from shared import fastjson
from shared.backends import OPERATIONS, TORCHSERVE, Target
from shared.errors import DispatchError
from shared.models import TaskError, TaskStatus, TaskView
from shared.priorities import Priority

TERMINAL = tuple(s.value for s in TaskStatus if s.terminal)


class TaskField(str, Enum):
    """The fields of a task record, and which script writes each (all values are strings)."""

    status = "status"  # TaskStatus; task_submit/batch_add_items, then each transition
    model_name = "model_name"  # submit
    model_version = "model_version"  # submit; '' for TorchServe's default version
    created_at = "created_at"  # submit; epoch seconds
    deadline = "deadline"  # submit; epoch seconds
    owner = "owner"  # submit; the caller's name (api/auth.py), checked on every read
    origin = "origin"  # submit; the model server's origin
    backend = "backend"  # submit; the backend's name (absent in records from before backends)
    operation = "operation"  # submit, when not the backend protocol's default operation
    priority = "priority"  # submit; Priority, hence its queue and depth counter
    webhook = "webhook"  # submit, with a webhook; read by lib.lua emit_event
    webhook_events = "webhook_events"  # submit, with a webhook: the subscribed types, ","-joined
    batch = "batch"  # batch_add_items: the batch id; read by lib.lua batch_move
    custom_id = "custom_id"  # batch_add_items: the item's id in its batch
    deliveries = "deliveries"  # task_start: deliveries so far
    started_at = "started_at"  # task_start
    worker = "worker"  # task_start: the worker running it
    # task_start: "<epoch seconds> <worker>" of each delivery it let run, one per line, the
    # first DELIVERY_LOG_LIMIT (keys.py): the console's timeline (started_at is the latest only)
    starts = "starts"
    finished_at = "finished_at"  # every ending (lib.lua end_task)
    result = "result"  # task_finish: the answer (see the module's doc)
    result_type = "result_type"  # task_finish: the answer's Content-Type when it is not JSON
    error = "error"  # an ending other than success: TaskError's JSON
    cancel_requested = "cancel_requested"  # task_cancel of a running task: "1"
    webhook_event = "webhook_event"  # lib.lua emit_event: the latest event's id
    stream = "stream"  # submit, for `stream: true`: "1"; lib.lua end_task then ends its stream
    message = "message"  # submit: the id of the message carrying it (its copy: keys.py K.message)
    reconciled = "reconciled"  # task_reconcile: times its lost message was pushed again
    # submit: RETRY_KEEP_SECONDS, when not 0: an ending failed, expired or canceled keeps its
    # payload and message copy that long (at most the record's TTL; lib.lua publish_record,
    # close_task), for POST /tasks/{id}/retry (api/retry.py)
    retry_keep = "retry_keep"
    # submit: "1" when the request carried per-request credentials (token, username, password):
    # nothing of it outlives its task (no retry_keep; its message copy is marked `secret`, see
    # lib.lua close_task), so such a task cannot be retried
    credentials = "credentials"
    retry_of = "retry_of"  # submit of a retry (api/retry.py): the id of the task it retries
    retried_as = "retried_as"  # task_retry_link: the id of the task that retries this one


@dataclass(frozen=True, slots=True)
class NewTask:
    """What a submit records for one task, before any worker saw it."""

    model_name: str
    model_version: str | None
    origin: str
    deadline: float
    priority: Priority
    webhook: str | None = None
    webhook_events: Sequence[str] = ()
    custom_id: str | None = None  # batch items only
    backend: str = TORCHSERVE
    operation: str | None = None  # None: its protocol's default (recorded_operation)
    stream: bool = False  # `stream: true`: its ending is appended to its stream (lib.lua)
    retry_keep: int = 0  # RETRY_KEEP_SECONDS (TaskField.retry_keep); 0: nothing kept for a retry
    credentials: bool = False  # per-request credentials: TaskField.credentials, nothing kept

    def item_fields(self) -> list[str]:
        """Field, value, ... beyond the status, time and owner (batch_add_items writes those
        once per call for all its items)."""
        fields = [
            TaskField.model_name.value, self.model_name,
            TaskField.model_version.value, self.model_version or "",
            TaskField.origin.value, self.origin,
            TaskField.backend.value, self.backend,
            TaskField.deadline.value, repr(self.deadline),
        ]  # fmt: skip
        if self.operation is not None:
            fields += [TaskField.operation.value, self.operation]
        if self.custom_id is not None:
            fields += [TaskField.custom_id.value, self.custom_id]
        fields += [TaskField.priority.value, self.priority.value]
        if self.webhook:  # read by the transition scripts, which emit the events
            fields += [TaskField.webhook.value, self.webhook]
            fields += [TaskField.webhook_events.value, ",".join(self.webhook_events)]
        if self.stream:
            fields += [TaskField.stream.value, "1"]
        if self.credentials:
            fields += [TaskField.credentials.value, "1"]
        elif self.retry_keep > 0:
            fields += [TaskField.retry_keep.value, str(self.retry_keep)]
        return fields

    def fields(self, created_at: float, owner: str) -> list[str]:
        """The whole record of a single submit: field, value, ..."""
        return [
            TaskField.status.value, TaskStatus.queued.value,
            TaskField.created_at.value, repr(created_at),
            TaskField.owner.value, owner,
            *self.item_fields(),
        ]  # fmt: skip


def recorded_operation(target: Target) -> str | None:
    """The operation as a record keeps it: None for its protocol's default (most tasks)."""
    return None if target.operation == OPERATIONS[target.protocol][0] else target.operation


def as_mapping(fields: Sequence[str]) -> dict[str, str]:
    """Field, value, ... as the dict `HGETALL` returns."""
    return dict(zip(fields[::2], fields[1::2], strict=True))


def _timestamp(raw: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(raw), UTC) if raw else None


def decode_record(task_id: str, fields: Mapping[str, str]) -> TaskView:
    """A task view from the hash as `HGETALL` returns it (decoded to str)."""
    error = fields.get("error")
    result = fields.get("result")
    return TaskView(
        task_id=task_id,
        status=TaskStatus(fields["status"]),
        model_name=fields["model_name"],
        model_version=fields.get("model_version") or None,
        backend=fields.get("backend") or TORCHSERVE,
        operation=fields.get("operation") or None,
        created_at=datetime.fromtimestamp(float(fields["created_at"]), UTC),
        started_at=_timestamp(fields.get("started_at")),
        finished_at=_timestamp(fields.get("finished_at")),
        deadline=datetime.fromtimestamp(float(fields["deadline"]), UTC),
        deliveries=int(fields.get("deliveries", 0)),
        worker=fields.get("worker") or None,
        cancel_requested=fields.get("cancel_requested") == "1",
        priority=Priority(fields["priority"]),
        batch_id=fields.get("batch") or None,
        custom_id=fields.get("custom_id"),
        retry_of=fields.get("retry_of") or None,
        retried_as=fields.get("retried_as") or None,
        prediction_value=fastjson.loads(result) if result is not None else None,
        prediction_content_type=fields.get("result_type"),
        error=TaskError.model_validate_json(error) if error else None,
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one task ended, as task_finish stores it."""

    task_id: str
    status: TaskStatus
    field: str  # 'result' or 'error'
    value: str  # JSON
    extra: list[str] = dataclass_field(default_factory=list)  # more fields: name, value, ...

    @classmethod
    def succeeded(cls, task_id: str, value: Any, content_type: str | None = None) -> Outcome:
        """`value`: the answer as worker/torchserve.py parsed it; `content_type`: the answer's
        when it is not JSON (then `value` is its text or a `data:` URI of its bytes)."""
        extra = [TaskField.result_type.value, content_type] if content_type else []
        return cls(task_id, TaskStatus.succeeded, TaskField.result.value, json.dumps(value), extra)

    @classmethod
    def failed(cls, task_id: str, error: DispatchError) -> Outcome:
        body = error.body(task_id).model_dump_json()
        return cls(task_id, TaskStatus.failed, TaskField.error.value, body)


def charset_of(content_type: str | None) -> str:
    """The `charset` parameter of a Content-Type; UTF-8 when it names none."""
    for param in (content_type or "").split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            return value.strip().strip('"')
    return "utf-8"


def answer_bytes(value: Any, content_type: str) -> bytes:
    """The bytes TorchServe answered, from a stored non-JSON answer (`result_type` set)."""
    if isinstance(value, str) and value.startswith("data:"):
        header, _, encoded = value.partition(",")
        if header.endswith(";base64"):
            return base64.b64decode(encoded)
    return str(value).encode(charset_of(content_type))


def idempotency_record(fingerprint: str, held_id: str) -> str:
    """What an idempotency key holds: the request's fingerprint and the task (or batch) id.
    lib.lua's held_id reads the id back in the scripts."""
    return f"{fingerprint}:{held_id}"


def parse_idempotency_record(held: str) -> tuple[str, str]:
    """(fingerprint, id) of an idempotency record."""
    fingerprint, _, held_id = held.partition(":")
    return fingerprint, held_id
