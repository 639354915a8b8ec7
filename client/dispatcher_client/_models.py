"""What the service answers, as small frozen dataclasses (no pydantic: httpx is the only
dependency).

Each keeps the JSON it came from in `raw`, so a field the service adds later is readable before
this client knows its name.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ._errors import DispatcherError, UnexpectedResponse, error_from_body

TERMINAL_TASK = frozenset({"succeeded", "failed", "canceled", "expired"})
TERMINAL_BATCH = frozenset({"completed", "canceled"})


class Binary(bytes):
    """A binary prediction (an image, audio): the bytes, plus the `content_type` they came with."""

    content_type: str

    def __new__(cls, data: bytes, content_type: str) -> Binary:
        self = super().__new__(cls, data)
        self.content_type = content_type
        return self

    def __repr__(self) -> str:
        return f"Binary({len(self)} bytes, {self.content_type!r})"


def decode_data_uri(value: str) -> Binary | None:
    """A base64 `data:` URI as `Binary`; None for anything else (plain text stays text)."""
    if not value.startswith("data:"):
        return None
    header, comma, encoded = value.partition(",")
    if not comma or not header.endswith(";base64"):
        return None
    content_type = header[len("data:") : -len(";base64")] or "application/octet-stream"
    try:
        return Binary(base64.b64decode(encoded, validate=True), content_type)
    except (binascii.Error, ValueError):
        return None


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _str(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise UnexpectedResponse(
            f"the answer has no {name!r}: {sorted(body)}", code="unexpected_response"
        )
    return value


def _object(body: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise UnexpectedResponse(f"{what}: expected a JSON object", code="unexpected_response")
    return body


def _error(body: Any, task_id: str | None) -> DispatcherError | None:
    """A stored `error` object as its exception (not raised: it describes the task)."""
    if not isinstance(body, Mapping):
        return None
    return error_from_body({"task_id": task_id, **body}, 0)


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """`GET /tasks/{id}`: where a task is. `prediction_value` is as the service sent it (a binary
    answer is a data URI here; `Task.result()` returns it as `Binary`)."""

    task_id: str
    status: str
    model_name: str | None = None
    model_version: str | None = None
    backend: str | None = None
    operation: str | None = None  # None: the backend protocol's default
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline: datetime | None = None
    cancel_requested: bool = False
    retry_of: str | None = None  # the task this one retries (`retry()`)
    retried_as: str | None = None  # the task that retries this one, once retried
    prediction_value: Any = None
    error: DispatcherError | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_TASK

    @classmethod
    def from_json(cls, body: Any) -> TaskInfo:
        body = _object(body, "task")
        task_id = _str(body, "task_id")
        error = body.get("error")
        return cls(
            task_id=task_id,
            status=_str(body, "status"),
            model_name=body.get("model_name"),
            model_version=body.get("model_version"),
            backend=body.get("backend"),
            operation=body.get("operation"),
            created_at=_time(body.get("created_at")),
            started_at=_time(body.get("started_at")),
            finished_at=_time(body.get("finished_at")),
            deadline=_time(body.get("deadline")),
            cancel_requested=bool(body.get("cancel_requested", False)),
            retry_of=body.get("retry_of"),
            retried_as=body.get("retried_as"),
            prediction_value=body.get("prediction_value"),
            error=_error(error, task_id),
            raw=body,
        )


@dataclass(frozen=True, slots=True)
class RequestCounts:
    """A batch's items by state."""

    total: int = 0
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0
    expired: int = 0

    @classmethod
    def from_json(cls, body: Any) -> RequestCounts:
        counts = body if isinstance(body, Mapping) else {}
        names = ("total", "queued", "running", "succeeded", "failed", "canceled", "expired")
        return cls(**{name: int(counts.get(name) or 0) for name in names})


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """`POST /batches` and `GET /batches/{id}`: a batch's status and counts."""

    batch_id: str
    status: str
    request_counts: RequestCounts
    created_at: datetime | None = None
    cancel_requested_at: datetime | None = None
    finished_at: datetime | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def done(self) -> bool:
        """`completed` or `canceled`: every item has ended."""
        return self.status in TERMINAL_BATCH

    @classmethod
    def from_json(cls, body: Any) -> BatchInfo:
        body = _object(body, "batch")
        return cls(
            batch_id=_str(body, "batch_id"),
            status=_str(body, "status"),
            request_counts=RequestCounts.from_json(body.get("request_counts")),
            created_at=_time(body.get("created_at")),
            cancel_requested_at=_time(body.get("cancel_requested_at")),
            finished_at=_time(body.get("finished_at")),
            raw=body,
        )


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One line of `GET /batches/{id}/results`, in input order. `value` is the prediction (a
    binary one decoded from its data URI as `Binary`) once `status` is `succeeded`; `error` the
    exception the item ended with; unfinished items show only their status."""

    custom_id: str
    task_id: str | None
    status: str
    value: Any = None
    error: DispatcherError | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    @classmethod
    def from_json(cls, body: Any) -> BatchResult:
        body = _object(body, "batch result line")
        task_id = body.get("task_id")
        value = body.get("prediction_value")
        if isinstance(value, str):
            value = decode_data_uri(value) or value
        error = body.get("error")
        return cls(
            custom_id=_str(body, "custom_id"),
            task_id=task_id if isinstance(task_id, str) else None,
            status=_str(body, "status"),
            value=value,
            error=_error(error, task_id),
            raw=body,
        )


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """One entry of `GET /backends`: a model server requests may name with `backend=`."""

    name: str
    protocol: str
    origin: str
    default: bool
    health: str  # "ok", or why not
    operations: tuple[str, ...] = ()
    models: tuple[str, ...] | None = None  # None: its protocol cannot list them, or it failed
    takes_bytes: bool | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def healthy(self) -> bool:
        return self.health == "ok"

    @classmethod
    def from_json(cls, body: Any) -> BackendInfo:
        body = _object(body, "backend")
        models = body.get("models")
        return cls(
            name=_str(body, "name"),
            protocol=_str(body, "protocol"),
            origin=str(body.get("origin", "")),
            default=bool(body.get("default", False)),
            health=str(body.get("health", "")),
            operations=tuple(str(op) for op in body.get("operations") or ()),
            models=tuple(str(m) for m in models) if isinstance(models, list) else None,
            takes_bytes=body.get("takes_bytes"),
            raw=body,
        )
