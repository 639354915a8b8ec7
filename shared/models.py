"""The request, the task record and the response bodies, shared by the API and the workers."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import Enum
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
)

from shared.backends import TORCHSERVE, Protocol, Target
from shared.payloads import PayloadRef
from shared.priorities import Priority

NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,128}$"


def _not_dots(name: str) -> str:
    # "." and ".." match the pattern but would walk out of /predictions/ once in a URL.
    if set(name) == {"."}:
        raise ValueError("must not be made of dots only")
    return name


ModelName = Annotated[
    str,
    Field(  # before the validator: a constraint after one is left out of the JSON schema
        pattern=NAME_PATTERN,
        description="Letters, digits, `_ . -`; 1-128 characters; no slashes; not dots only.",
        examples=["echo"],
        json_schema_extra={"not": {"pattern": r"^\.+$"}},
    ),
    AfterValidator(_not_dots),
]
# RFC 1123 host names and IP literals; anything else can't be an allow-listed target anyway.
HOST_PATTERN = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]{1,253})$"


class TaskStatus(str, Enum):
    """Where a task is in its life; the last four are terminal."""

    queued = "queued"  # accepted and waiting in the broker queue
    running = "running"  # a worker is calling the model server
    succeeded = "succeeded"  # the model server answered; prediction_value is stored
    failed = "failed"  # ended with an error; error is stored
    canceled = "canceled"  # canceled while queued; never reached the model server
    expired = "expired"  # its deadline passed before a worker started it

    @property
    def terminal(self) -> bool:
        return self not in (TaskStatus.queued, TaskStatus.running)


WebhookEventType = Literal[
    "task.started", "task.succeeded", "task.failed", "task.canceled", "task.expired",
    "task.output",
]  # fmt: skip
# A streamed task's outputs as they come, coalesced (shared/webhook_output.py): only with
# `stream: true`, since a task that does not stream has no outputs before its result.
OUTPUT_WEBHOOK_EVENT = "task.output"
DEFAULT_WEBHOOK_EVENTS = ("task.succeeded", "task.failed", "task.canceled", "task.expired")


# JSON values that cannot hold NaN or Infinity (exact types: a float subclass is checked).
_NEVER_NAN = frozenset({str, int, bool})


class PredictionRequest(BaseModel):
    """`POST /dispatch_model`: the new fields plus every field the original proxy accepted."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model_name: ModelName
    model_version: ModelName | None = None
    input: Any = Field(
        None, description="Any JSON value; sent as the JSON body of the TorchServe request."
    )
    data: str | None = Field(
        None,
        description="Instead of `input`: bytes as a data URI, `data:<media type>;base64,<...>`; "
        "TorchServe receives the decoded bytes as the raw body with that Content-Type.",
        examples=["data:image/png;base64,iVBORw0KGgo="],
    )
    backend: str | None = Field(
        None,
        description="The configured model server to call (`GET /backends` lists them); "
        "default DEFAULT_BACKEND.",
        examples=["torchserve"],
    )
    operation: str | None = Field(
        None,
        description="The call, per the backend's protocol: torchserve `predictions` (default), "
        "`explanations`; oip `infer` (default), `generate`; openai `chat.completions` (default), "
        "`completions`, `embeddings`.",
    )
    timeout: float | None = Field(
        None,
        gt=0,
        description="Deadline in seconds from submission (default DISPATCH_DEFAULT_TIMEOUT).",
    )
    priority: Priority | None = Field(
        None,
        description="The queue it waits in: `interactive` (default of a sync dispatch), "
        "`default` (of `Prefer: respond-async`) or `batch` (of batch items).",
    )
    stream: bool = Field(
        False,
        description="Stream the output as the model produces it: read it from `stream_url` "
        "(`GET /tasks/{task_id}/stream`, Server-Sent Events) while the task runs. Not for an "
        "operation that answers whole (TorchServe's explanations, OpenAI's embeddings: 422); "
        "for OpenAI-compatible backends this, not `input.stream`, asks for it.",
    )
    # The original proxy's fields, accepted unchanged.
    host: Annotated[str, Field(pattern=HOST_PATTERN)] | None = None
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    http_protocol: Literal["http", "https"] | None = None
    smarttool: Any = None
    max_model_page: Any = None
    postprocessingsteps: Any = None
    input_media_type: Any = None
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    webhook: str | None = Field(
        None,
        max_length=2048,
        description="URL that receives the task's events, signed (Standard Webhooks); its origin "
        "must be in WEBHOOK_ALLOWED_ORIGINS.",
        examples=["https://hooks.example.com/dispatcher"],
    )
    webhook_events: list[WebhookEventType] | None = Field(
        None,
        min_length=1,
        description="Events sent to `webhook` (a list, or comma-separated in forms and query "
        "strings); default: the terminal ones. `task.output` (the outputs as they come, at "
        "most one delivery every 0.5 s) only with `stream: true`.",
    )

    @field_validator("webhook_events", mode="before")
    @classmethod
    def _comma_separated_events(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("webhook_events")
    @classmethod
    def _output_needs_stream(
        cls, value: list[str] | None, info: ValidationInfo
    ) -> list[str] | None:
        # `stream` is declared first, so it is validated (or missing) by now. Without a stream
        # there are no outputs before the result: the subscription could never be sent.
        if value and OUTPUT_WEBHOOK_EVENT in value and info.data.get("stream") is not True:
            raise ValueError('task.output is sent only for a streamed task: add "stream": true')
        return value

    @property
    def has_credentials(self) -> bool:
        """Whether it carries per-request credentials: then nothing of it outlives its task (a
        retry cannot resend them; shared/redis_state/record.py TaskField.credentials)."""
        return bool(self.token or self.username or self.password)

    def webhook_event_types(self) -> tuple[str, ...]:
        """The subscribed event types, deduplicated and in a stable order (for the fingerprint)."""
        return tuple(sorted(set(self.webhook_events or DEFAULT_WEBHOOK_EVENTS)))

    @field_validator("input", "max_model_page", "postprocessingsteps", "input_media_type")
    @classmethod
    def _finite_json(cls, value: Any) -> Any:
        # Python's JSON parser accepts NaN and Infinity; JSON, and the TorchServe call, do not.
        if value is None or type(value) in _NEVER_NAN:
            return value  # nothing to serialize to know (most fields are None, most inputs not)
        try:
            json.dumps(value, allow_nan=False)
        except ValueError:
            raise ValueError("NaN and Infinity are not JSON; send finite numbers") from None
        return value

    @field_validator("data")
    @classmethod
    def _one_payload(cls, value: str | None, info: ValidationInfo) -> str | None:
        # `input` is declared first, so it is validated (or missing) by now.
        if value is not None and info.data.get("input") is not None:
            raise ValueError("send either input (JSON) or data (a data URI), not both")
        return value

    @field_validator("http_protocol", mode="before")
    @classmethod
    def _lowercase_protocol(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    def backend_body(self, target: Target) -> Any:
        """What the backend receives: TorchServe's body as the original proxy sent it; an OIP
        request body unchanged; an OpenAI body with `model` set from `model_name`."""
        if target.protocol is Protocol.torchserve:
            return self.torchserve_body()
        if target.protocol is Protocol.openai and isinstance(self.input, dict):
            return {**self.input, "model": self.model_name}
        return self.input

    def torchserve_body(self) -> Any:
        """What TorchServe receives: `input`, or exactly the original proxy's body without it."""
        if self.input is not None:
            return self.input
        return {
            "max-model-page": self.max_model_page,
            "postprocessingsteps": self.postprocessingsteps,
            "input-media-type": self.input_media_type,
        }


class PredictionCall(BaseModel):
    """One TorchServe call as the API enqueues it and a worker runs it (the message's argument)."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    origin: str
    model_name: str
    model_version: str | None
    body: Any
    # The backend's name (shared/backends.py) and the operation of its protocol: a worker looks
    # the backend up in its own settings. Messages from before backends carry neither.
    backend: str = TORCHSERVE
    operation: str = "predictions"
    deadline: float  # epoch seconds
    # When the API accepted it (epoch seconds), for the queue-wait metrics.
    submitted_at: float
    # Its priority class: the order a worker runs a message's tasks in, the metrics' label.
    priority: Priority
    # Bytes instead of the JSON `body` (shared/payloads.py): inline, or a claim-check key.
    payload: PayloadRef | None = None
    # Whether the backend is asked for a streamed answer, each chunk appended to the task's
    # stream as it arrives (worker/backends/stream_call.py). Older messages lack it: False.
    stream: bool = False
    # Credentials travel only inside the broker message, never into records, logs or errors.
    token: str | None = Field(None, repr=False)
    username: str | None = Field(None, repr=False)
    password: str | None = Field(None, repr=False)

    @property
    def path(self) -> str:
        parts = [
            "predictions",
            self.model_name,
            *([self.model_version] if self.model_version else []),
        ]
        return "/" + "/".join(quote(part, safe="") for part in parts)

    def __repr__(self) -> str:
        if self.backend == TORCHSERVE and self.operation == "predictions":
            return f"PredictionCall({self.origin}{self.path})"
        version = f"/{self.model_version}" if self.model_version else ""
        return f"PredictionCall({self.backend} {self.operation} {self.model_name}{version})"


def call_fields(
    request: PredictionRequest,
    target: Target,
    deadline: float,
    submitted_at: float,
    priority: Priority,
    payload: PayloadRef | None,
) -> dict[str, Any]:
    """The `PredictionCall` a request becomes, as the message carries it (JSON-ready fields).

    The one place a call is built, for a single submit and every batch item alike. A dict, not
    the model: the worker validates the call when it takes the message, and building a model
    per item would be most of a 10,000-item batch's cost in the API.
    """
    return {
        "origin": target.origin,
        "model_name": request.model_name,
        "model_version": request.model_version,
        "body": request.backend_body(target) if payload is None else None,
        "backend": target.backend,
        "operation": target.operation,
        "payload": payload.model_dump() if payload is not None else None,
        "deadline": deadline,
        "submitted_at": submitted_at,
        "priority": priority.value,
        "stream": request.stream,
        "token": request.token.get_secret_value() if request.token else None,
        "username": request.username,
        "password": request.password.get_secret_value() if request.password else None,
    }


class TaskError(BaseModel):
    """The error body: the original proxy's `status`/`msg` plus a machine-readable code."""

    status: int
    msg: str
    code: str
    task_id: str | None = None


class TaskView(BaseModel):
    """`GET /tasks/{id}` and the 200 of a finished dispatch."""

    task_id: str
    status: TaskStatus
    model_name: str
    model_version: str | None = None
    backend: str = Field(TORCHSERVE, description="The backend (model server) it was sent to.")
    operation: str | None = Field(
        None, description="Its backend's operation, when not the protocol's default."
    )
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline: datetime
    deliveries: int = Field(0, description="How often a worker picked the task up.")
    worker: str | None = Field(None, description="The worker that ran (or runs) the task.")
    cancel_requested: bool = False
    priority: Priority = Priority.default
    batch_id: str | None = Field(None, description="The batch the task is an item of.")
    custom_id: str | None = Field(None, description="Its batch item's `custom_id`.")
    retry_of: str | None = Field(
        None, description="The task this one retries (`POST /tasks/{task_id}/retry`)."
    )
    retried_as: str | None = Field(
        None, description="The task that retries this one, once it was retried."
    )
    prediction_value: Any = None
    # The answer's Content-Type (None: JSON), for `/tasks/{id}/result`; a data URI carries its own.
    prediction_content_type: str | None = Field(None, exclude=True)
    error: TaskError | None = None


class Accepted(BaseModel):
    """The 202 of a dispatch that is not finished yet."""

    task_id: str
    status: TaskStatus
    status_url: str
    stream_url: str | None = Field(
        None, description="Where the task's output streams (asked with `stream: true`)."
    )


def utcnow() -> datetime:
    return datetime.now(UTC)
