"""Every failure leaves the API in the original proxy's error shape: status, msg, code, task_id."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.routing import Match

from shared.errors import (
    DispatchError,
    InvalidRequest,
    QueueFull,
    QueueUnavailable,
    redis_write_refusal,
)

log = logging.getLogger(__name__)
# What an unexpected exception answers (here and in api/request_id.py, which answers it itself
# when the exception escapes to the middleware).
INTERNAL_ERROR = "internal error; the operator can find it in the API log"

# Seconds a 429 asks the client to wait before retrying.
QUEUE_FULL_RETRY_AFTER = 5
# The methods a 405's `Allow` may list, in the order it lists them.
ALLOW_ORDER = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
HTTP_CODES = {
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def queue_refuses_writes(reason: str, outcome: str) -> QueueUnavailable:
    """The 503 for a Redis that answers but refuses writes; `outcome`: what that left undone."""
    return QueueUnavailable(
        f"the task queue (Redis) refuses writes: {reason}; {outcome}: retry once it accepts them"
    )


def error_response(error: DispatchError, task_id: str | None = None) -> JSONResponse:
    headers = {"Retry-After": str(QUEUE_FULL_RETRY_AFTER)} if isinstance(error, QueueFull) else None
    body = error.body(task_id).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=error.status, headers=headers)


# The two ways to resume a stream (api/routes/streams.py); the value is never echoed.
EVENT_ID_FIELDS = ("Last-Event-ID", "last_event_id")
EVENT_ID_PROBLEM = (
    "not an event id of this stream: send an `id:` the stream sent (<ms>-<seq>), or none"
)


def _field(location: Sequence[Any]) -> str:
    parts = [str(part) for part in location if part not in ("body", "query", "header", "path")]
    return ".".join(parts) or "body"


def describe_validation(errors: Sequence[Any]) -> str:
    """One sentence per problem, each naming the field to fix."""
    problems = []
    for error in errors:
        field, kind = _field(error.get("loc", ())), error.get("type", "")
        if kind == "json_invalid":
            problems.append("the body is not valid JSON: send a JSON object")
        elif kind == "missing" and field == "body":
            problems.append("the body is missing: send a JSON object with at least model_name")
        elif kind in ("model_attributes_type", "dict_type") and field == "body":
            problems.append("the body must be a JSON object with at least model_name")
        elif kind == "string_pattern_mismatch" and field in EVENT_ID_FIELDS:
            problems.append(f"{field}: {EVENT_ID_PROBLEM}")
        elif kind == "string_pattern_mismatch":
            problems.append(f"{field}: use 1-128 letters, digits, '_', '.', '-' (no '/' or spaces)")
        elif kind == "value_error" and error.get("ctx", {}).get("error"):
            problems.append(f"{field}: {error['ctx']['error']}")  # without "Value error, "
        else:
            problems.append(f"{field}: {error.get('msg', 'is invalid')}")
    return "; ".join(dict.fromkeys(problems))


def allowed_methods(request: Request) -> str:
    """Every method some route takes at the request's path, for a 405's `Allow`.

    Starlette's 405 names the methods of the first route that matched the path only, and a path
    often has a route per method (GET and DELETE /tasks/{task_id}). Each method is asked of the
    router as a request of it would be (routers included in the app answer for their routes).
    """
    routes = request.app.router.routes
    return ", ".join(
        method
        for method in ALLOW_ORDER
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    )


def install_error_handlers(app: FastAPI) -> None:
    async def dispatch_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, DispatchError)
        return error_response(error)

    async def validation_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return error_response(InvalidRequest(describe_validation(error.errors())))

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, HTTPException)
        code = HTTP_CODES.get(error.status_code, "http_error")
        body = {"status": error.status_code, "msg": str(error.detail), "code": code}
        headers = error.headers
        allowed = allowed_methods(request) if error.status_code == 405 else ""
        if allowed:  # empty inside a mounted app (the docs' static files): its own Allow stays
            headers = {**(headers or {}), "Allow": allowed}
        return JSONResponse(body, status_code=error.status_code, headers=headers)

    async def redis_error(_: Request, error: Exception) -> JSONResponse:
        refusal = redis_write_refusal(error)
        if refusal is not None:  # it answers, but this request needed a write
            log.warning("Redis refuses writes: %s", refusal)
            return error_response(queue_refuses_writes(refusal, "nothing was changed"))
        log.warning("Redis unavailable: %s", type(error).__name__)
        return error_response(
            QueueUnavailable("the task queue (Redis) is unavailable; retry in a few seconds")
        )

    async def unexpected_error(_: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=error)
        return error_response(DispatchError(INTERNAL_ERROR))

    app.add_exception_handler(DispatchError, dispatch_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RedisError, redis_error)
    app.add_exception_handler(Exception, unexpected_error)
