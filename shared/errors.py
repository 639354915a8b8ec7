"""Every error the dispatcher reports, in one tree.

Each class fixes the HTTP status and the machine-readable `code` of the error body; the message
says what happened and what to do. `retryable` decides whether a worker tries TorchServe again.
"""

from __future__ import annotations

from typing import ClassVar

from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError

from shared.models import TaskError


class DispatchError(Exception):
    """Base of every error the service turns into an error body."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False

    def __init__(self, msg: str, *, status: int | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        if status is not None:
            self.status = status  # type: ignore[misc]  # per-instance status for pass-through 4xx

    def body(self, task_id: str | None = None) -> TaskError:
        return TaskError(status=self.status, msg=self.msg, code=self.code, task_id=task_id)


# --- Raised by the API before anything is enqueued -------------------------------------------


class InvalidRequest(DispatchError):
    """The request body, query or headers are malformed."""

    status = 422
    code = "invalid_request"


class UnknownBackend(InvalidRequest):
    """`backend` names no configured backend (BACKENDS); the message lists the configured ones."""

    code = "unknown_backend"


class UnsupportedOperation(InvalidRequest):
    """`operation` is not one of the backend's protocol (or the body does not fit it)."""

    code = "unsupported_operation"


class Unauthorized(DispatchError):
    """No API key, or not one of DISPATCHER_API_KEYS."""

    status = 401
    code = "unauthorized"


class TargetNotAllowed(DispatchError):
    """host/port/http_protocol pick a TorchServe that is not on the allow-list."""

    status = 403
    code = "target_not_allowed"


class InvalidIdempotencyKey(DispatchError):
    """The Idempotency-Key header is not a 1-255 character string or token."""

    status = 400
    code = "invalid_idempotency_key"


class InvalidRequestId(DispatchError):
    """The X-Request-ID header is not 1-128 printable ASCII characters."""

    status = 400
    code = "invalid_request_id"


class IdempotencyKeyReused(DispatchError):
    """The Idempotency-Key was used (by this caller) for a different request."""

    status = 422
    code = "idempotency_key_reused"


class WebhookNotAllowed(DispatchError):
    """The webhook URL is not on WEBHOOK_ALLOWED_ORIGINS, or points into a private network."""

    status = 403
    code = "webhook_not_allowed"


class NoWebhookEvent(DispatchError):
    """`/tasks/{id}/deliveries/retry` of a task that has no webhook event (yet)."""

    status = 409
    code = "no_webhook_event"


class TaskNotFound(DispatchError):
    """No task with that id was submitted (by this caller), or its record has expired."""

    status = 404
    code = "task_not_found"


class TaskAlreadyFinished(DispatchError):
    """The task ended already, so it cannot be canceled."""

    status = 409
    code = "task_finished"


class TaskNotRetryable(DispatchError):
    """POST /tasks/{id}/retry of a task that did not fail, expire or get canceled: it is still
    queued or running, or it succeeded."""

    status = 409
    code = "not_retryable"


class RetryUnavailable(DispatchError):
    """POST /tasks/{id}/retry of a task whose request or payload is no longer kept (they are
    kept RETRY_KEEP_SECONDS after it ended; 0: retry is off), or whose retry has expired."""

    status = 409
    code = "retry_unavailable"


class BatchNotFound(DispatchError):
    """No batch with this id for this caller (never submitted, expired, or another key's)."""

    status = 404
    code = "batch_not_found"


class BatchFinished(DispatchError):
    """DELETE of a batch that has already ended."""

    status = 409
    code = "batch_finished"


class PayloadTooLarge(DispatchError):
    """The request body is over MAX_BODY_BYTES."""

    status = 413
    code = "payload_too_large"


class ResultNotAvailable(DispatchError):
    """`/tasks/{id}/result` of a task that has not succeeded (yet): it has no answer."""

    status = 409
    code = "no_result"


class QueueFull(DispatchError):
    """MAX_QUEUE_DEPTH tasks are waiting already; retry after the Retry-After delay."""

    status = 429
    code = "queue_full"


class QueueUnavailable(DispatchError):
    """Redis cannot be reached (or refuses writes), so nothing can be enqueued or looked up."""

    status = 503
    code = "queue_unavailable"


class WriteNotReplicated(QueueUnavailable):
    """A submit was written, but WAIT did not find it on enough replicas in time
    (REDIS_MIN_REPLICAS, every live one: shared/replica_wait.py): a failover could lose it."""


# Error replies with which a Redis that otherwise answers refuses writes, and why, in the words an
# operator needs. Reads still work, so these are not connection errors: see redis_write_refusal.
REDIS_WRITE_REFUSALS = {
    "OOM": "it is out of memory (used memory over 'maxmemory' under the noeviction policy; "
    "free memory or raise maxmemory)",
    "READONLY": "it is a read-only replica (after a failover, REDIS_URL must name the new primary)",
    "MISCONF": "it cannot save to disk (stop-writes-on-bgsave-error; see its log)",
    "NOREPLICAS": "too few replicas are connected (min-replicas-to-write)",
}


def redis_write_refusal(error: BaseException) -> str | None:
    """Why Redis refused a write, or None when `error` is something else.

    redis-py maps a plain `OOM`/`READONLY` reply to its own classes, but inside a Lua script
    Redis 6 wraps the reply ("Error running script ... -OOM command not allowed ..."), and Redis 7
    passes it on as the script's error: match the reply code in the text as well.
    """
    if isinstance(error, OutOfMemoryError):
        return REDIS_WRITE_REFUSALS["OOM"]
    if isinstance(error, ReadOnlyError):
        return REDIS_WRITE_REFUSALS["READONLY"]
    if not isinstance(error, ResponseError):
        return None
    text = str(error)
    for code, reason in REDIS_WRITE_REFUSALS.items():
        if text.startswith(code + " ") or f"-{code} " in text:
            return reason
    return None


# --- Raised by a worker while running a task --------------------------------------------------


class ModelNotFound(DispatchError):
    """TorchServe has no such model or version."""

    status = 404
    code = "model_not_found"


class ModelRejectedInput(DispatchError):
    """The model's handler answered with a 4xx; status and message are passed through."""

    status = 422
    code = "model_rejected_input"


class BackendUnavailable(DispatchError):
    """The model server refused the connection, or said 503 or 429 after every retry.

    `retry_after`: the seconds its Retry-After asked for, which the next attempt waits at least.
    """

    status = 503
    code = "backend_unavailable"
    retryable = True

    def __init__(self, msg: str, *, retry_after: float | None = None) -> None:
        super().__init__(msg)
        self.retry_after = retry_after


class BackendTimeout(DispatchError):
    """The model server did not answer within the per-attempt read timeout."""

    status = 504
    code = "backend_timeout"
    retryable = True


class BackendAuthRejected(DispatchError):
    """The model server refused the backend's token (401/403, TorchServe's InvalidKeyException)."""

    status = 502
    code = "backend_auth_rejected"


class BackendFailed(DispatchError):
    """The model server answered a 5xx other than 503 (or a redirect, or a body that is not its
    protocol's): the model or the server broke."""

    status = 502
    code = "backend_error"


class StreamBroken(BackendFailed):
    """A streamed answer ended wrong after its 200 went out: cut short, closed without its
    protocol's end (OpenAI's `[DONE]` or a finish reason), or framed in a way its protocol does
    not allow (a chunk that is not JSON, an event over the size limit). The chunks already
    received stay readable; the task fails, since its final result would be incomplete."""

    code = "stream_broken"


class BackendNotConfigured(DispatchError):
    """A message names a backend (or an operation of it) that the worker's own settings lack:
    the API's and the workers' BACKENDS differ, as mid-rollout. Not the request's fault (the API
    accepted it), and a worker never calls a server its own settings do not name."""

    status = 503
    code = "backend_not_configured"


# TorchServe's own codes, kept for the clients that match them; each is its backend error.
class TorchServeUnavailable(BackendUnavailable):
    """TorchServe refused the connection or said 503 (no worker, queue full)."""

    code = "torchserve_unavailable"


class TorchServeTimeout(BackendTimeout):
    """TorchServe did not answer within the per-attempt read timeout."""

    code = "torchserve_timeout"


class TorchServeAuthRejected(BackendAuthRejected):
    """TorchServe refused the inference token (its InvalidKeyException)."""

    code = "torchserve_auth_rejected"


class TorchServeFailed(BackendFailed):
    """TorchServe answered 5xx other than 503: the model or the server broke."""

    code = "torchserve_error"


class PayloadLost(DispatchError):
    """The task's claim-checked payload is gone from Redis (expired or evicted) before it ran."""

    status = 503
    code = "payload_lost"


class DeadlineExceeded(DispatchError):
    """The task was still running when its deadline (`timeout`) passed."""

    status = 504
    code = "deadline_exceeded"


class TaskExpired(DispatchError):
    """The task's deadline passed before any worker started it; it never reached TorchServe."""

    status = 504
    code = "expired"


class TaskCanceled(DispatchError):
    """The task was canceled before a worker started it."""

    status = 409
    code = "canceled"


class WorkerLost(DispatchError):
    """The task's worker died too many times (or its record was orphaned); it was given up."""

    status = 503
    code = "worker_lost"
