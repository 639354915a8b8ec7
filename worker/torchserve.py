"""The TorchServe inference client: one call, retried by error type, mapped to the error tree."""

from __future__ import annotations

import asyncio
import base64
import codecs
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

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
from worker.http_client import ConnectError, HttpError, Pool, ReadTimeout, Transport

log = logging.getLogger(__name__)

# A retry never starts with less than this left before the deadline: it could not finish anyway.
MIN_ATTEMPT_SECONDS = 0.05
# Full jitter keeps many workers that failed together from retrying together.
JITTER = 0.5
# What every attempt sends besides its body and credentials. Identity: this client does not
# decompress, and TorchServe compresses nothing it is not asked to.
DEFAULT_HEADERS = (
    ("User-Agent", "model-dispatcher"),
    ("Accept", "*/*"),
    ("Accept-Encoding", "identity"),
)


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


def _torchserve_message(content: bytes) -> tuple[str, str]:
    """(type, message) of a TorchServe error body, or ("", text) when it is not JSON."""
    body = parse_body(content)
    if isinstance(body, dict):
        return str(body.get("type", "")), str(body.get("message", "")).strip()
    return "", str(body).strip()[:500]


def error_for_response(status: int, content: bytes, origin: str, model: str) -> DispatchError:
    """Map a non-200 TorchServe answer (its status and body) to the error the caller sees."""
    kind, message = _torchserve_message(content)
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


def encode_json(body: Any) -> bytes:
    """A JSON body, compact and in UTF-8 rather than escapes (as common clients send it), and
    NaN or Infinity refused (ValueError) rather than sent as something that is not JSON."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


class TorchServeClient:
    """Calls `/predictions/...`; retries what may pass (503, refused, timeout) by the deadline.

    One per worker process, used from its one event loop: every call the process has in flight
    shares one pool of keep-alive connections to each TorchServe (worker/http_client.py), so
    a call costs a coroutine, not a thread. Redirects are never followed (a redirect could point
    anywhere: no SSRF through TorchServe), and no cookie carries over from one task's call to
    another's. It may be built before the loop runs: nothing binds to a loop until a call.
    """

    def __init__(
        self,
        settings: Settings,
        pool: Transport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        *,
        max_per_origin: int = 256,
    ) -> None:
        self._settings = settings
        self._sleep = sleep
        if pool is None:
            pool = Pool(
                connect_timeout=settings.torchserve_connect_timeout,
                read_timeout=settings.torchserve_read_timeout,
                max_per_origin=max_per_origin,
            )
        self._pool = pool

    async def aclose(self) -> None:
        """Close the pool's connections, a given pool's too (the client is its only user)."""
        await self._pool.aclose()

    async def predict(self, call: PredictionCall) -> Any:
        """The parsed prediction of a JSON call, or a DispatchError after bounded retries."""
        return (await self.predict_answer(call)).value

    async def predict_answer(self, call: PredictionCall, payload: bytes | None = None) -> Answer:
        """The answer, or a DispatchError after bounded retries.

        `payload`: the bytes of `call.payload` (read from the message or the claim check), sent
        as the raw body or as multipart parts; without it the call's JSON `body` is sent.
        """
        if call.origin not in self._settings.allowed_origins:
            raise TargetNotAllowed(f"{call.origin} is not an allowed TorchServe target")
        body, body_headers = self._request_body(call, payload)
        url = call.origin + call.path
        attempt = 1
        while True:
            try:
                with metrics.torchserve_request(call.model_name):
                    return await self._attempt(call, url, body, body_headers)
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
                await self._sleep(delay)
                attempt += 1

    def _backoff(self, attempt: int) -> float:
        ceiling = min(
            self._settings.retry_backoff_max,
            self._settings.retry_backoff_initial * 2.0 ** (attempt - 1),
        )
        jitter: float = 1 - JITTER + JITTER * random.random()  # noqa: S311 - not crypto
        return ceiling * jitter

    @staticmethod
    def _request_body(
        call: PredictionCall, payload: bytes | None
    ) -> tuple[bytes, tuple[tuple[str, str], ...]]:
        """The body and its Content-Type, built once for every attempt (none without a body)."""
        ref = call.payload
        if ref is None or payload is None:
            if call.body is None:
                return b"", ()
            return encode_json(call.body), (("Content-Type", "application/json"),)
        if ref.multipart:
            content, content_type = encode_multipart(ref.parts, payload)
        else:
            content, content_type = payload, ref.parts[0].content_type or DEFAULT_MEDIA_TYPE
        return content, (("Content-Type", content_type),)

    async def _attempt(
        self, call: PredictionCall, url: str, body: bytes, body_headers: tuple[tuple[str, str], ...]
    ) -> Answer:
        remaining = call.deadline - time.time()
        if remaining <= 0:
            raise DeadlineExceeded(f"the task's deadline passed before {call.origin} answered")
        read_timeout = min(self._settings.torchserve_read_timeout, remaining)
        headers = [*DEFAULT_HEADERS, *self._credentials(call), *body_headers]
        request_id = current_request_id()
        if request_id is not None:  # a handler reads it: context.get_request_header(i, ...)
            headers.append(("X-Request-ID", request_id))
        with tracing.client_span("POST", url) as span:
            headers += span.headers
            status, content_type, content = await self._exchange(
                call.origin, url, headers, body, read_timeout
            )
            span.answered(status)
        if status == 200:
            return parse_answer(content, content_type)
        raise error_for_response(status, content, call.origin, call.model_name)

    async def _exchange(
        self, origin: str, url: str, headers: list[tuple[str, str]], body: bytes,
        read_timeout: float,
    ) -> tuple[int, str | None, bytes]:  # fmt: skip
        """(status, Content-Type, body) of one answer read whole, or the DispatchError of why
        there was none (named by the origin and the error's type, never by the body)."""
        try:
            response = await self._pool.request(
                "POST", url, headers, body, read_timeout=read_timeout
            )
            try:
                content = await response.read()
            finally:
                await response.aclose()
        except ConnectError as error:
            raise TorchServeUnavailable(f"cannot connect to TorchServe at {origin}") from error
        except ReadTimeout as error:
            if read_timeout < self._settings.torchserve_read_timeout:
                raise DeadlineExceeded(
                    f"TorchServe at {origin} was still working when the deadline passed"
                ) from error
            raise TorchServeTimeout(
                f"TorchServe at {origin} did not answer within {read_timeout:g}s"
            ) from error
        except (HttpError, ValueError) as error:  # ValueError: a header with a line break
            raise TorchServeUnavailable(
                f"connection to TorchServe at {origin} failed ({type(error).__name__})"
            ) from error
        return response.status, response.header("content-type"), content

    def _credentials(self, call: PredictionCall) -> tuple[tuple[str, str], ...]:
        """The request's token; else its basic auth; else the configured default token."""
        if call.token:
            return (("Authorization", f"Bearer {call.token}"),)
        if call.username:
            return (("Authorization", basic_auth_header(call.username, call.password or "")),)
        default = self._settings.torchserve_token
        return (("Authorization", f"Bearer {default.get_secret_value()}"),) if default else ()
