"""The one call interface every protocol implements, and what the protocols' wires share.

A protocol (torchserve.py, oip.py, openai.py) knows only its own wire: the URL of an operation,
the body and headers a call sends, how an answer reads and how an error maps onto the error tree
(shared/errors.py). What a call does whatever its backend speaks lives once, in caller.py: the
attempts, their backoff and Retry-After, the deadline, the CLIENT span, `X-Request-ID`, the
metrics. So a protocol never sleeps, times or retries, and the caller never parses a body.
A streamed answer (issue 18) keeps the split: the caller reads the chunks, under its timeouts
and error mapping, and the protocol decodes them.
"""

from __future__ import annotations

import base64
import codecs
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

from shared import fastjson
from shared.backends import Backend
from shared.errors import (
    BackendAuthRejected,
    BackendFailed,
    BackendTimeout,
    BackendUnavailable,
    DispatchError,
    ModelNotFound,
    ModelRejectedInput,
)
from shared.models import PredictionCall
from shared.payloads import DEFAULT_MEDIA_TYPE
from shared.redis_state.record import charset_of
from shared.settings import Settings
from worker.http_client import Reply

# How much of a backend's error text a message keeps: enough to read, never a whole page.
MESSAGE_CHARS = 500
REDACTED = "[redacted]"
Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Answer:
    """A prediction as stored: JSON parsed, text as str, anything else as a data URI.

    `content_type` is None for JSON (the common case stores nothing extra), else the answer's.
    """

    value: Any
    content_type: str | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """One call's HTTP request, built once for all of its attempts.

    `headers`: the body's and the protocol's (Content-Type, credentials); the caller adds the
    ones every backend gets (User-Agent, X-Request-ID, traceparent).
    """

    origin: str
    url: str
    body: bytes = b""
    headers: Headers = ()
    method: str = "POST"


class BackendClient(ABC):
    """A protocol's side of calls to one configured backend (one per backend and process)."""

    # The errors of a refused connection and of a read timeout (TorchServe keeps its own codes).
    unavailable: ClassVar[type[BackendUnavailable]] = BackendUnavailable
    timeout: ClassVar[type[BackendTimeout]] = BackendTimeout

    def __init__(self, backend: Backend, settings: Settings) -> None:
        self.backend = backend
        self.settings = settings

    def where(self, origin: str) -> str:
        """How messages name the server: by the backend's name, protocol and origin."""
        return f"backend {self.backend.name!r} ({self.backend.protocol.value}) at {origin}"

    def url(self, path: str) -> str:
        return self.backend.origin + self.backend.base_path + path

    def succeeded(self, status: int) -> bool:
        """Whether `status` carries an answer (`answer`) rather than an error (`error`)."""
        return 200 <= status < 300

    @abstractmethod
    def request(self, call: PredictionCall, payload: bytes | None) -> Request:
        """The request of `call`; `payload`: the bytes of `call.payload`, when it has one.
        Raises a DispatchError for a call the protocol cannot send (nothing is sent then)."""

    @abstractmethod
    def answer(self, content: bytes, reply: Reply) -> Answer:
        """The answer of a successful status, from its body and headers."""

    @abstractmethod
    def error(
        self, status: int, content: bytes, reply: Reply, call: PredictionCall
    ) -> DispatchError:
        """The error of any other status: the caller raises it, and retries it if retryable."""

    def redact(self, text: str) -> str:
        """`text` without the backend's token: a server may echo the credential it refused."""
        token = self.backend.token.get_secret_value() if self.backend.token else ""
        return text.replace(token, REDACTED) if token else text


# --- what the wires share ---------------------------------------------------------------------


def encode_json(body: Any) -> bytes:
    """A JSON body, compact and in UTF-8 rather than escapes (as common clients send it), and
    NaN or Infinity refused (ValueError) rather than sent as something that is not JSON."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def parse_body(content: bytes) -> Any:
    """JSON parsed (whatever the Content-Type says), else the text."""
    try:
        return fastjson.loads(content)
    except ValueError:
        return content.decode("utf-8", errors="replace")


def parse_answer(content: bytes, content_type: str | None) -> Answer:
    """A 200 kept with its Content-Type (TorchServe sends none for JSON): JSON parses, text
    decodes, and bytes are never decoded as text, they become a data URI."""
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
    return Answer(data_uri(content, media_type), media_type)


def data_uri(content: bytes, media_type: str = DEFAULT_MEDIA_TYPE) -> str:
    return f"data:{media_type};base64,{base64.b64encode(content).decode('ascii')}"


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a `Retry-After` asks for (RFC 9110: delay-seconds or an HTTP date), else None."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_text(content: bytes, redact: Callable[[str], str] = str) -> str:
    """The message of an error body in the shapes OIP and OpenAI-compatible servers send:
    `{"error": "..."}` (OIP, TGI), `{"error": {"message", "type", "code"}}` (OpenAI),
    `{"object": "error", "message": ...}` (vLLM), FastAPI's `{"detail": ...}`; else the text.
    `redact` runs on the whole text before it is cut to MESSAGE_CHARS: cut first, a secret
    straddling the cut would keep its first characters, which no longer match it."""
    body = parse_body(content)
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            error = error.get("message", error)
        for found in (error, body.get("message"), body.get("detail")):
            if found:
                return _compact(found, redact)
        return _compact(body, redact)
    return _compact(body, redact)


def _compact(value: Any, redact: Callable[[str], str]) -> str:
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        # FastAPI's validation errors: `loc: msg` each, the body part that was wrong first.
        value = "; ".join(
            f"{'.'.join(str(loc) for loc in item.get('loc', ()))}: {item.get('msg', item)}"
            for item in value
        )
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return redact(text.strip())[:MESSAGE_CHARS]


def status_error(
    client: BackendClient, status: int, content: bytes, reply: Reply, call: PredictionCall
) -> DispatchError:
    """The error tree's answer to an OIP or OpenAI error status (TorchServe has its own)."""
    where = client.where(client.backend.origin)
    message = error_text(content, client.redact)
    said = f": {message}" if message else ""
    if status in (401, 403):
        return BackendAuthRejected(
            f"{where} refused the credentials ({status}){said}; check the backend's token in "
            "BACKENDS"
        )
    if status == 404:
        return ModelNotFound(f"{where} has no model {call.model_name!r} (404){said}")
    if status in (429, 503):
        delay = retry_after(reply.header("retry-after"))
        busy = "is rate limiting" if status == 429 else "is unavailable"
        return client.unavailable(f"{where} {busy} ({status}){said}", retry_after=delay)
    if 400 <= status < 500:
        return ModelRejectedInput(f"{where} rejected the input ({status}){said}", status=422)
    if 300 <= status < 400:
        return BackendFailed(f"{where} answered a redirect ({status}); redirects are not followed")
    # A server error's text is not kept: KServe's 500 quotes the input it choked on, and
    # payload bytes never reach an error message. The backend's own log has it.
    return BackendFailed(f"{where} failed ({status}); see the backend's log for its message")
