"""One exception class per family of the dispatcher's error codes, all under `DispatcherError`.

The service answers every failure as `{"status", "msg", "code", "task_id"}` (README, Errors);
`error_for` picks the class by `code` first and by HTTP status for codes this client does not
know yet, so a newer server never surfaces as a bare `DispatcherError` of the wrong family.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import httpx


class DispatcherError(Exception):
    """Base of every error this client raises.

    `status` is the HTTP status (0 when no answer came back), `code` the service's error code,
    `message` its explanation (what to fix), `task_id` the task it concerns, if any.
    `retry_after` is the server's `Retry-After` in seconds, when it sent one; `body` the whole
    error body (a batch's 422 lists every bad item under `errors`).
    """

    codes: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        code: str = "error",
        task_id: str | None = None,
        retry_after: float | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.body: Mapping[str, Any] = body or {}
        self.message = message
        self.status = status
        self.code = code
        self.task_id = task_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f" (task {self.task_id})" if self.task_id else ""
        return f"{self.status} {self.code}: {self.message}{where}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status}, code={self.code!r}, "
            f"message={self.message!r}, task_id={self.task_id!r})"
        )


class InvalidRequest(DispatcherError):
    """400/422: the request is malformed (the message names the field), or its
    Idempotency-Key was used before for another request."""

    codes = (
        "invalid_request",
        "invalid_idempotency_key",
        "idempotency_key_reused",
        "unknown_backend",
        "unsupported_operation",
    )


class Unauthorized(DispatcherError):
    """401: no API key, or not a valid one."""

    codes = ("unauthorized",)


class Forbidden(DispatcherError):
    """403: the TorchServe target or the webhook URL is not allow-listed."""

    codes = ("target_not_allowed", "webhook_not_allowed")


class NotFound(DispatcherError):
    """404: an unknown model, task or batch."""

    codes: ClassVar[tuple[str, ...]] = ("not_found",)


class ModelNotFound(NotFound):
    """404: TorchServe has no such model or version."""

    codes = ("model_not_found",)


class TaskNotFound(NotFound):
    """404: no task with that id, for this API key."""

    codes = ("task_not_found",)


class BatchNotFound(NotFound):
    """404: no batch with that id, for this API key."""

    codes = ("batch_not_found",)


class Conflict(DispatcherError):
    """409: the task is in the wrong state for this (cancel of a finished task, a result of a
    task that has not succeeded, a retry of one that did not fail or whose request is no longer
    kept)."""

    codes: ClassVar[tuple[str, ...]] = (
        "task_finished",
        "no_result",
        "no_webhook_event",
        "batch_finished",
        "not_retryable",
        "retry_unavailable",
    )


class TaskCanceled(Conflict):
    """The task was canceled before it ran."""

    codes = ("canceled",)


class PayloadTooLarge(DispatcherError):
    """413: the payload is over the server's MAX_BODY_BYTES."""

    codes = ("payload_too_large",)


class ModelRejectedInput(DispatcherError):
    """422: the model's handler refused the input (its message says why)."""

    codes = ("model_rejected_input",)


class QueueFull(DispatcherError):
    """429: the queue is full; raised once the client's retries are used up."""

    codes = ("queue_full",)


class ModelFailed(DispatcherError):
    """502: the model server or the model's handler failed, refused the token, or broke a
    streamed answer it had begun (`stream_broken`)."""

    codes = (
        "torchserve_error",
        "torchserve_auth_rejected",
        "backend_error",
        "backend_auth_rejected",
        "stream_broken",
    )


class ServiceUnavailable(DispatcherError):
    """503: TorchServe or the queue is unavailable, or the task's worker or payload was lost."""

    codes = (
        "torchserve_unavailable",
        "backend_unavailable",
        "backend_not_configured",
        "queue_unavailable",
        "worker_lost",
        "payload_lost",
    )


class TaskTimeout(DispatcherError):
    """504: the model did not answer in time, the task ran past its `timeout`, or it expired
    before a worker started it."""

    codes = ("torchserve_timeout", "backend_timeout", "deadline_exceeded", "expired")


class WaitTimeout(DispatcherError):
    """Client side: `predict(wait=...)` or `Task.result(timeout=...)` ran out while the task is
    still queued or running. The task goes on: `client.task(error.task_id)` re-attaches."""

    codes = ("wait_timeout",)


class TransportError(DispatcherError):
    """Client side: no answer from the service (connection refused or reset, timeouts) after
    the client's retries."""

    codes = ("transport_error",)


class UnexpectedResponse(DispatcherError):
    """An answer this client cannot read (not the service's JSON shape)."""

    codes = ("unexpected_response",)


_BY_CODE: dict[str, type[DispatcherError]] = {
    code: cls
    for cls in (
        InvalidRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        ModelNotFound,
        TaskNotFound,
        BatchNotFound,
        Conflict,
        TaskCanceled,
        PayloadTooLarge,
        ModelRejectedInput,
        QueueFull,
        ModelFailed,
        ServiceUnavailable,
        TaskTimeout,
    )
    for code in cls.codes
}
_BY_STATUS: dict[int, type[DispatcherError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidRequest,
    429: QueueFull,
    502: ModelFailed,
    503: ServiceUnavailable,
    504: TaskTimeout,
}


def error_for(
    status: int,
    code: str,
    message: str,
    task_id: str | None = None,
    retry_after: float | None = None,
    body: Mapping[str, Any] | None = None,
) -> DispatcherError:
    """The exception for an error body (or a task's stored `error`)."""
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or DispatcherError
    return cls(
        message, status=status, code=code, task_id=task_id, retry_after=retry_after, body=body
    )


def error_from_body(body: Any, status: int, retry_after: float | None = None) -> DispatcherError:
    """From a parsed error body; anything not in the service's shape is `UnexpectedResponse`."""
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        task_id = body.get("task_id")
        return error_for(
            int(body.get("status") or status),
            body["code"],
            str(body.get("msg") or body.get("message") or body["code"]),
            task_id if isinstance(task_id, str) else None,
            retry_after,
            body,
        )
    return error_for(
        status, "http_error", f"HTTP {status} without an error body", None, retry_after
    )


def error_from_response(response: httpx.Response, retry_after: float | None) -> DispatcherError:
    """The exception for a non-2xx answer. Only the first 200 characters of a body that is not
    the service's JSON are quoted: a proxy's HTML page is not a message."""
    try:
        body = response.json()
    except ValueError:
        text = response.text[:200].strip()
        return error_for(
            response.status_code,
            "http_error",
            f"HTTP {response.status_code} from {response.request.url.path}: {text or 'no body'}",
            None,
            retry_after,
        )
    return error_from_body(body, response.status_code, retry_after)
