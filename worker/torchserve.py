"""The TorchServe inference client: one call, retried by error type, mapped to the error tree."""

from __future__ import annotations

import base64
import codecs
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from shared import fastjson, tracing
from shared.errors import (
    DeadlineExceeded,
    DispatchError,
    ModelNotFound,
    ModelRejectedInput,
    TargetNotAllowed,
    TorchServeAuthRejected,
    TorchServeFailed,
    TorchServeTimeout,
    TorchServeUnavailable,
)
from shared.logs import current_request_id
from shared.models import PredictionCall
from shared.payloads import DEFAULT_MEDIA_TYPE, encode_multipart
from shared.redis_state.record import charset_of
from shared.settings import Settings
from worker import task_metrics as metrics

log = logging.getLogger(__name__)

# A retry never starts with less than this left before the deadline: it could not finish anyway.
MIN_ATTEMPT_SECONDS = 0.05
# Full jitter keeps many workers that failed together from retrying together.
JITTER = 0.5


def parse_body(content: bytes) -> Any:
    """TorchServe sends JSON without a Content-Type: parse it, and fall back to text."""
    try:
        return fastjson.loads(content)
    except ValueError:
        return content.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class Answer:
    """A prediction as stored: JSON parsed, text as str, anything else as a data URI.

    `content_type` is None for JSON (the common case stores nothing extra), else the answer's.
    """

    value: Any
    content_type: str | None = None


def parse_answer(content: bytes, content_type: str | None) -> Answer:
    """TorchServe's 200 kept with its Content-Type (TorchServe sends none for JSON): JSON parses,
    text decodes, and bytes are never decoded as text, they become a data URI."""
    media = (content_type or "").partition(";")[0]
    media = media.strip().lower()
    if not media or media == "application/json" or media.endswith("+json"):
        try:
            return Answer(fastjson.loads(content))
        except ValueError:
            pass
    if not media or media.startswith("text/"):
        try:
            charset = charset_of(content_type)
            codecs.lookup(charset)
            return Answer(content.decode(charset), content_type or "text/plain; charset=utf-8")
        except (LookupError, UnicodeDecodeError):
            pass
    media_type = content_type or DEFAULT_MEDIA_TYPE
    encoded = base64.b64encode(content).decode("ascii")
    return Answer(f"data:{media_type};base64,{encoded}", media_type)


def _torchserve_message(response: httpx.Response) -> tuple[str, str]:
    """(type, message) of a TorchServe error body, or ("", text) when it is not JSON."""
    body = parse_body(response.content)
    if isinstance(body, dict):
        return str(body.get("type", "")), str(body.get("message", "")).strip()
    return "", str(body).strip()[:500]


def error_for_response(response: httpx.Response, origin: str, model: str) -> DispatchError:
    """Map a non-200 TorchServe answer to the error the caller sees."""
    status = response.status_code
    kind, message = _torchserve_message(response)
    where = f"TorchServe at {origin}"
    if kind == "InvalidKeyException":
        return TorchServeAuthRejected(
            f"{where} rejected the inference token: send a valid `token` or set TORCHSERVE_TOKEN"
        )
    if status == 404:
        return ModelNotFound(message or f"{where} has no model {model!r}")
    if status == 503 and kind == "InternalServerException":
        # TorchServe's answer to an exception in the model's handler: retrying will not help.
        return TorchServeFailed(f"the model {model!r} failed on {where}: {message}")
    if status == 503:
        return TorchServeUnavailable(
            f"{where} is overloaded or has no worker for {model!r}: {message}"
        )
    if 400 <= status < 500:
        return ModelRejectedInput(
            message or f"{where} rejected the input ({status})", status=status
        )
    if 300 <= status < 400:
        return TorchServeFailed(
            f"{where} answered a redirect ({status}); redirects are not followed"
        )
    return TorchServeFailed(f"{where} failed ({status}): {message or 'no message'}")


def basic_auth_header(username: str, password: str) -> str:
    """`Authorization` for basic auth, as httpx.BasicAuth builds it (UTF-8, then base64)."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


class TorchServeClient:
    """Calls `/predictions/...`; retries what may pass (503, refused, timeout) by the deadline.

    One per process, shared by its threads: one pool of keep-alive connections to each TorchServe.
    Each attempt goes straight to the transport (httpx's connection pool) with a request built
    here: httpx.Client's layers around it (auth and redirect flows, cookie jar, event hooks, URL
    and header merging) did nothing this call needs and cost measurable worker CPU per task.
    Redirects are never followed (a redirect could point anywhere: no SSRF through TorchServe),
    and no cookie carries over from one task's call to another's.
    """

    def __init__(
        self,
        settings: Settings,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._settings = settings
        self._sleep = sleep
        self._transport = transport or httpx.HTTPTransport(
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            trust_env=False,
        )
        # Kept for its default headers and for tracing: the instrumentation wraps the client's
        # transport, which is `self._transport` itself, so every attempt is still a child span.
        self._http = httpx.Client(
            transport=self._transport, follow_redirects=False, trust_env=False
        )
        self._default_headers = dict(self._http.headers)  # User-Agent, Accept... as before
        tracing.instrument_httpx(self._http)  # the TorchServe call: a child of the task's span

    def close(self) -> None:
        self._http.close()

    def predict(self, call: PredictionCall) -> Any:
        """The parsed prediction of a JSON call, or a DispatchError after bounded retries."""
        return self.predict_answer(call).value

    def predict_answer(self, call: PredictionCall, payload: bytes | None = None) -> Answer:
        """The answer, or a DispatchError after bounded retries.

        `payload`: the bytes of `call.payload` (read from the message or the claim check), sent
        as the raw body or as multipart parts; without it the call's JSON `body` is sent.
        """
        if call.origin not in self._settings.allowed_origins:
            raise TargetNotAllowed(f"{call.origin} is not an allowed TorchServe target")
        request = self._request_body(call, payload)
        attempt = 1
        while True:
            try:
                with metrics.torchserve_request(call.model_name):
                    return self._attempt(call, request)
            except DispatchError as error:
                delay = self._backoff(attempt)
                if not error.retryable or attempt >= self._settings.retry_max_attempts:
                    raise
                if time.time() + delay + MIN_ATTEMPT_SECONDS >= call.deadline:
                    raise DeadlineExceeded(
                        f"deadline passed while retrying {call.origin}: {error.msg}"
                    ) from error
                log.info("retrying %r in %.2fs after %s", call, delay, error.code)
                metrics.count_retry(call.model_name, error.code)
                self._sleep(delay)
                attempt += 1

    def _backoff(self, attempt: int) -> float:
        ceiling = min(
            self._settings.retry_backoff_max,
            self._settings.retry_backoff_initial * 2.0 ** (attempt - 1),
        )
        jitter: float = 1 - JITTER + JITTER * random.random()  # noqa: S311 - not crypto
        return ceiling * jitter

    @staticmethod
    def _request_body(call: PredictionCall, payload: bytes | None) -> dict[str, Any]:
        """httpx arguments for the body, built once for every attempt."""
        ref = call.payload
        if ref is None or payload is None:
            return {"json": call.body}
        if ref.multipart:
            content, content_type = encode_multipart(ref.parts, payload)
        else:
            content, content_type = payload, ref.parts[0].content_type or DEFAULT_MEDIA_TYPE
        return {"content": content, "headers": {"Content-Type": content_type}}

    def _attempt(self, call: PredictionCall, body: dict[str, Any]) -> Answer:
        remaining = call.deadline - time.time()
        if remaining <= 0:
            raise DeadlineExceeded(f"the task's deadline passed before {call.origin} answered")
        read_timeout = min(self._settings.torchserve_read_timeout, remaining)
        connect_timeout = self._settings.torchserve_connect_timeout
        headers = {**self._default_headers, **self._credentials(call)}
        request_id = current_request_id()
        if request_id is not None:  # a handler reads it: context.get_request_header(i, ...)
            headers["X-Request-ID"] = request_id
        request = httpx.Request(
            "POST",
            call.origin + call.path,
            json=body.get("json"),
            content=body.get("content"),
            headers={**headers, **body.get("headers", {})},
            # What httpx.Timeout(read_timeout, connect=...).as_dict() gives the transport.
            extensions={
                "timeout": {
                    "connect": connect_timeout,
                    "read": read_timeout,
                    "write": read_timeout,
                    "pool": read_timeout,
                }
            },
        )
        try:
            response = self._transport.handle_request(request)
            try:
                response.read()
            finally:
                response.close()
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            raise TorchServeUnavailable(f"cannot connect to TorchServe at {call.origin}") from error
        except httpx.TimeoutException as error:
            if read_timeout < self._settings.torchserve_read_timeout:
                raise DeadlineExceeded(
                    f"TorchServe at {call.origin} was still working when the deadline passed"
                ) from error
            raise TorchServeTimeout(
                f"TorchServe at {call.origin} did not answer within {read_timeout:g}s"
            ) from error
        except httpx.TransportError as error:
            raise TorchServeUnavailable(
                f"connection to TorchServe at {call.origin} failed ({type(error).__name__})"
            ) from error
        if response.status_code == 200:
            return parse_answer(response.content, response.headers.get("content-type"))
        raise error_for_response(response, call.origin, call.model_name)

    def _credentials(self, call: PredictionCall) -> dict[str, str]:
        """The request's token; else its basic auth; else the configured default token."""
        if call.token:
            return {"Authorization": f"Bearer {call.token}"}
        if call.username:
            return {"Authorization": basic_auth_header(call.username, call.password or "")}
        default = self._settings.torchserve_token
        return {"Authorization": f"Bearer {default.get_secret_value()}"} if default else {}
