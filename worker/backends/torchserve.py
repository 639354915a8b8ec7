"""TorchServe's inference API: `/predictions/...` and `/explanations/...`, and its errors.

Everything here is as it was before there were other backends: the origin allow-list of the
original proxy's `host`/`port` targets, the request's own token or basic auth before the
configured TORCHSERVE_TOKEN, bytes sent as the raw body or as multipart parts, TorchServe's
error types mapped to the error tree with TorchServe's own codes.
"""

from __future__ import annotations

import base64
from typing import ClassVar
from urllib.parse import quote

from shared.backends import TORCHSERVE
from shared.errors import (
    DispatchError,
    ModelNotFound,
    ModelRejectedInput,
    TargetNotAllowed,
    TorchServeAuthRejected,
    TorchServeFailed,
    TorchServeTimeout,
    TorchServeUnavailable,
)
from shared.models import PredictionCall
from shared.payloads import DEFAULT_MEDIA_TYPE, encode_multipart
from worker.backends.base import (
    Answer,
    BackendClient,
    Headers,
    Request,
    bearer,
    encode_json,
    parse_answer,
    parse_body,
    retry_after,
)
from worker.http_client import Reply

DEFAULT_TOKEN_HINT = "send a valid `token` or set TORCHSERVE_TOKEN"  # noqa: S105 - a hint


def _torchserve_message(content: bytes) -> tuple[str, str]:
    """(type, message) of a TorchServe error body, or ("", text) when it is not JSON."""
    body = parse_body(content)
    if isinstance(body, dict):
        return str(body.get("type", "")), str(body.get("message", "")).strip()
    return "", str(body).strip()[:500]


def error_for_response(
    status: int,
    content: bytes,
    where: str,
    model: str,
    token_hint: str = DEFAULT_TOKEN_HINT,
    delay: float | None = None,
) -> DispatchError:
    """Map a non-200 TorchServe answer (its status and body) to the error the caller sees;
    `where` names the server, `delay` is what a 503's Retry-After asked for."""
    kind, message = _torchserve_message(content)
    if kind == "InvalidKeyException":
        return TorchServeAuthRejected(f"{where} rejected the inference token: {token_hint}")
    if status == 404:
        return ModelNotFound(message or f"{where} has no model {model!r}")
    if status == 503 and kind == "InternalServerException":
        # TorchServe's answer to an exception in the model's handler: retrying will not help.
        return TorchServeFailed(f"the model {model!r} failed on {where}: {message}")
    if status == 503:
        return TorchServeUnavailable(
            f"{where} is overloaded or has no worker for {model!r}: {message}", retry_after=delay
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


def torchserve_path(call: PredictionCall) -> str:
    """`/{operation}/{model}[/{version}]`: the operations are TorchServe's path names."""
    parts = [call.operation, call.model_name, *([call.model_version] if call.model_version else [])]
    return "/" + "/".join(quote(part, safe="") for part in parts)


class TorchServe(BackendClient):
    """Calls of one TorchServe backend: `torchserve` (TORCHSERVE_URL, and the allow-listed
    origins a request may pick) or one of BACKENDS with protocol `torchserve`."""

    unavailable: ClassVar[type[TorchServeUnavailable]] = TorchServeUnavailable
    timeout: ClassVar[type[TorchServeTimeout]] = TorchServeTimeout

    def where(self, origin: str) -> str:
        """`torchserve` keeps the original proxy's wording; another names its backend."""
        if self.backend.name == TORCHSERVE:
            return f"TorchServe at {origin}"
        return super().where(origin)

    def succeeded(self, status: int) -> bool:
        return status == 200

    def request(self, call: PredictionCall, payload: bytes | None) -> Request:
        if self.backend.name == TORCHSERVE:
            origin = call.origin
            if origin not in self.settings.allowed_origins:
                raise TargetNotAllowed(f"{origin} is not an allowed TorchServe target")
        else:  # a configured TorchServe: its own URL, whatever the message says
            origin = self.backend.origin
        url = origin + self.backend.base_path + torchserve_path(call)
        body, body_headers = self._body(call, payload)
        return Request(origin, url, body, (*self._credentials(call), *body_headers))

    def answer(self, content: bytes, reply: Reply) -> Answer:
        return parse_answer(content, reply.header("content-type"))

    def error(
        self, status: int, content: bytes, reply: Reply, call: PredictionCall
    ) -> DispatchError:
        origin = call.origin if self.backend.name == TORCHSERVE else self.backend.origin
        hint = DEFAULT_TOKEN_HINT
        if self.backend.name != TORCHSERVE:
            hint = f"send a valid `token` or set the token of {self.backend.name!r} in BACKENDS"
        delay = retry_after(reply.header("retry-after"))
        return error_for_response(status, content, self.where(origin), call.model_name, hint, delay)

    @staticmethod
    def _body(call: PredictionCall, payload: bytes | None) -> tuple[bytes, Headers]:
        """The body and its Content-Type (none without a body)."""
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

    def _credentials(self, call: PredictionCall) -> Headers:
        """The request's token; else its basic auth; else the backend's (TORCHSERVE_TOKEN)."""
        if call.token:
            return (bearer(call.token),)
        if call.username:
            return (("Authorization", basic_auth_header(call.username, call.password or "")),)
        default = self.backend.token
        return (bearer(default.get_secret_value()),) if default else ()
