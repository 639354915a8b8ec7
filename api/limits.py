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
    """ASGI middleware: 413 when Content-Length or the streamed body exceeds the body limit.

    `path_limits`: paths with a limit of their own (POST /batches: MAX_BATCH_BYTES).
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, path_limits: dict[str, tuple[int, str]] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = path_limits or {}

    def _error(self, limit: tuple[int, str] | None = None) -> PayloadTooLarge:
        size, name = limit or (self.max_bytes, "MAX_BODY_BYTES")
        return PayloadTooLarge(f"the request body is larger than {size} bytes ({name}); send less")

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
        own = self.path_limits.get(scope["path"])
        limit = own[0] if own else body_limit(content_type, self.max_bytes)
        if length.isdigit() and int(length) > limit:
            await error_response(self._error(own))(scope, receive, send)
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
                    error = self._error(own)
                    raise HTTPException(error.status, error.msg)
            return message

        await self.app(scope, limited_receive, send)
