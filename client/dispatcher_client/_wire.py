"""The HTTP side without I/O: what to send, and what an answer means.

Every operation is a generator (a "flow") that yields `Call`s and `Sleep`s and is sent back the
`httpx.Response` of each call (transport errors are thrown into it). `_client.py` drives flows
with `httpx.Client` and `time.sleep`, `_async.py` with `httpx.AsyncClient` and `asyncio.sleep`, so
retries, re-attaching and error mapping exist once (the sans-I/O style of h11 and httpcore).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from ._errors import DispatcherError, TransportError, error_from_response
from ._retry import RetryPolicy, retry_after, retryable_transport_error, should_retry

T = TypeVar("T")
VERSION = "0.1.0"
JSON_TYPE = "application/json"
# Content types the service reads as a JSON or multipart request rather than as a raw payload:
# bytes of these types go as a data URI inside a JSON request instead.
_STRUCTURED_TYPES = ("application/json", "multipart/form-data")


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request. `wait` is how long the server may hold it (a long poll or a sync
    dispatch): the read timeout is the client's timeout plus that."""

    method: str
    path: str
    params: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    content: bytes | None = None
    wait: float = 0.0
    stream: bool = False  # the driver leaves a successful body unread (JSONL results)


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


Step = Call | Sleep
Flow = Generator[Step, httpx.Response | None, T]


def build_request(
    http: httpx.Client | httpx.AsyncClient, call: Call, timeout: httpx.Timeout
) -> httpx.Request:
    """The httpx request for `call` on either client (both build requests the same way)."""
    read = None if timeout.read is None else timeout.read + call.wait
    return http.build_request(
        call.method,
        call.path,
        params=dict(call.params),
        headers=dict(call.headers),
        content=call.content,
        timeout=httpx.Timeout(
            connect=timeout.connect, read=read, write=timeout.write, pool=timeout.pool
        ),
    )


def client_headers(api_key: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    """Headers on every request: who we are, and the API key (never logged by this client)."""
    base = {"User-Agent": f"model-dispatcher-client/{VERSION}"}
    if api_key:
        base["Authorization"] = f"Bearer {api_key}"
    return {**base, **(headers or {})}


def new_idempotency_key() -> str:
    """One per logical call, reused by each of its retries (a bare token: a UUID)."""
    return str(uuid.uuid4())


def json_call(method: str, path: str, body: Any, headers: Mapping[str, str] | None = None) -> Call:
    content = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    return Call(
        method, path, headers={"Content-Type": JSON_TYPE, **(headers or {})}, content=content
    )


def data_uri(data: bytes, content_type: str | None) -> str:
    return f"data:{content_type or ''};base64,{base64.b64encode(data).decode('ascii')}"


def _media(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A `POST /dispatch_model` request, in the form its payload needs."""

    model_name: str
    input: Any = None
    data: bytes | None = None
    content_type: str | None = None
    version: str | None = None
    timeout: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    backend: str | None = None  # a configured backend (GET /backends); None: the default
    operation: str | None = None  # one of the backend's protocol; None: its default

    def __post_init__(self) -> None:
        if self.data is not None and self.input is not None:
            raise ValueError("pass either input (JSON) or data (bytes), not both")
        if self.data is not None and not isinstance(self.data, bytes | bytearray | memoryview):
            raise TypeError("data must be bytes; pass JSON values as input")

    def call(self, key: str, prefer: str) -> Call:
        """JSON for `input`; for bytes the raw-body form (fields in the query string), unless
        their type would be read as JSON or multipart: then a data URI inside JSON."""
        headers = {"Idempotency-Key": key, "Prefer": prefer}
        fields: dict[str, Any] = {"model_name": self.model_name, **self.extra}
        if self.version is not None:
            fields["model_version"] = self.version
        if self.timeout is not None:
            fields["timeout"] = self.timeout
        if self.backend is not None:
            fields["backend"] = self.backend
        if self.operation is not None:
            fields["operation"] = self.operation
        content_type = self.content_type or "application/octet-stream"
        if self.data is None or _media(content_type) in _STRUCTURED_TYPES:
            if self.data is not None:
                fields["data"] = data_uri(bytes(self.data), content_type)
            elif self.input is not None:
                fields["input"] = self.input
            return json_call("POST", "/dispatch_model", fields, headers)
        params = {name: _query_value(value) for name, value in fields.items() if value is not None}
        return Call(
            "POST",
            "/dispatch_model",
            params=params,
            headers={**headers, "Content-Type": content_type},
            content=bytes(self.data),
        )


def _query_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)  # webhook_events=a,b
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def batch_items(requests: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Batch items as the service takes them: `data` given as bytes becomes a data URI with the
    item's `content_type`, and `version` is spelled `model_version`."""
    items = []
    for index, request in enumerate(requests):
        item = dict(request)
        content_type = item.pop("content_type", None)
        if "version" in item:
            item["model_version"] = item.pop("version")
        data = item.get("data")
        if isinstance(data, bytes | bytearray | memoryview):
            item["data"] = data_uri(bytes(data), content_type)
        elif content_type is not None:
            raise ValueError(f"requests[{index}]: content_type goes with data given as bytes")
        items.append(item)
    return items


def prefer_wait(seconds: float) -> str:
    """The Prefer header for a server-side wait of `seconds` (0: answer at once)."""
    if seconds <= 0:
        return "respond-async"
    return f"wait={seconds:.3f}".rstrip("0").rstrip(".")


def check(response: httpx.Response) -> httpx.Response:
    """The response if it is a success, else its error raised."""
    if response.is_success:
        return response
    raise error_from_response(response, retry_after(response))


def read_json(response: httpx.Response) -> Any:
    try:
        return check(response).json()
    except ValueError:
        raise DispatcherError(
            f"HTTP {response.status_code} from {response.request.url.path} is not JSON",
            status=response.status_code,
            code="unexpected_response",
        ) from None


def send(call: Call, policy: RetryPolicy) -> Flow[httpx.Response]:
    """`call` with retries of 429/503 and connection failures, within `policy`'s bounds.

    Returns the last response, success or not (the caller maps errors); raises TransportError
    when no response came at all. The call is sent unchanged each time, Idempotency-Key
    included, which is what makes retrying a POST safe.
    """
    started = time.monotonic()
    attempt = 1
    while True:
        response: httpx.Response | None = None
        try:
            response = yield call
        except httpx.TransportError as error:
            if not retryable_transport_error(error):
                raise _transport_error(call, error) from error
            failure: httpx.TransportError | None = error
            delay = policy.backoff(attempt)
        else:
            assert response is not None
            if not should_retry(response):
                return response
            failure = None
            asked = retry_after(response)
            delay = policy.backoff(attempt) if asked is None else asked
        out_of_time = time.monotonic() - started + delay > policy.max_elapsed
        if attempt >= policy.max_attempts or out_of_time:
            if failure is not None:
                raise _transport_error(call, failure) from failure
            assert response is not None
            return response
        yield Sleep(delay)  # the drivers have read and closed every response but a stream's
        attempt += 1


def _transport_error(call: Call, error: httpx.TransportError) -> TransportError:
    # The exception's class says what failed; its text may quote the URL, which is no secret
    # (the API key travels in a header).
    return TransportError(
        f"{call.method} {call.path}: {type(error).__name__}: {error or 'no detail'}",
        code="transport_error",
    )
