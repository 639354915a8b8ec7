"""Request body size limit, enforced while the body streams in (not after buffering it all)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from shared.errors import PayloadTooLarge

# Room for the request fields around a payload of MAX_BODY_BYTES (JSON keys, form fields and
# part headers). The payload itself is bounded exactly by api/inputs.py.
ENVELOPE_BYTES = 64 * 1024


def body_limit(content_type: bytes, max_bytes: int) -> int:
    """How much body to read at most for this Content-Type: MAX_BODY_BYTES bounds the payload
    as TorchServe receives it, so a JSON body may carry a data URI of that many decoded bytes
    (base64: 4/3 as long) and a multipart body the fields beside the file parts."""
    media = content_type.partition(b";")[0].strip().lower()
    if media == b"application/json":
        return -(-max_bytes // 3) * 4 + ENVELOPE_BYTES
    if media == b"multipart/form-data":
        return max_bytes + ENVELOPE_BYTES
    return max_bytes


class BodySizeLimit:
    """ASGI middleware: 413 when Content-Length or the streamed body exceeds the body limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is larger than {self.max_bytes} bytes (MAX_BODY_BYTES); send less"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        content_type, length = b"", b""
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"content-type":
                content_type = value
        limit = body_limit(content_type, self.max_bytes)
        if length.isdigit() and int(length) > limit:
            await error_response(self._error())(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI turns any other exception from the body into a 400 "error parsing
                    # the body"; an HTTPException passes through to the 413 handler.
                    raise HTTPException(self._error().status, self._error().msg)
            return message

        await self.app(scope, limited_receive, send)
