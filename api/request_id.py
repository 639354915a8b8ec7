"""X-Request-ID: taken from the client (1-128 printable ASCII characters) or generated, echoed
on every response, bound to every log line of the request (shared/logs.py).

One pure ASGI middleware, so it costs a header scan and a uuid per request, and it sees every
response: errors from handlers, the body-size limit, and the 500 of an unexpected exception
(which Starlette's outermost ServerErrorMiddleware would otherwise send without the header). The
id then travels on: `shared.celery_app.encode_task_message` puts it into the Celery message
headers and the worker sends it to TorchServe as `X-Request-ID`.
"""

from __future__ import annotations

import os
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import INTERNAL_ERROR, error_response
from shared.errors import DispatchError, InvalidRequestId
from shared.logs import request_context

HEADER = b"x-request-id"
MAX_LENGTH = 128
# Printable ASCII, space included: safe in a log line, a header and a Celery message.
_VALID = re.compile(rb"[\x20-\x7e]{1,%d}" % MAX_LENGTH)


def new_request_id() -> str:
    """32 random hex digits (a uuid4's worth of randomness, at an eighth of uuid4()'s cost)."""
    return os.urandom(16).hex()


class RequestId:
    """Reads or makes the request id, binds it for logs and messages, echoes it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = next((value for name, value in scope["headers"] if name == HEADER), None)
        valid = supplied is None or _VALID.fullmatch(supplied) is not None
        request_id = supplied.decode("ascii") if supplied is not None and valid else None
        request_id = request_id or new_request_id()
        echoed = (HEADER, request_id.encode("ascii"))
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", ()), echoed]}
            await send(message)

        with request_context(request_id):
            if not valid:
                error = InvalidRequestId(
                    f"X-Request-ID: send 1-{MAX_LENGTH} printable ASCII characters, or no "
                    "X-Request-ID header to have one generated"
                )
                await error_response(error)(scope, receive, send_with_id)
                return
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                # Answer the 500 here, with the id; ServerErrorMiddleware sees the response has
                # started, so it only logs the exception (through its handler) and re-raises.
                if not started:
                    await error_response(DispatchError(INTERNAL_ERROR))(
                        scope, receive, send_with_id
                    )
                raise
