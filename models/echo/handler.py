"""Echo demo model: answers every request with the JSON body it received, unchanged."""

from __future__ import annotations

import json
from typing import Any


def _body(request: dict[str, Any]) -> Any:
    """The request's payload: TorchServe gives a dict for JSON, bytes or str otherwise."""
    body = request.get("body", request.get("data"))
    if isinstance(body, bytes | bytearray):
        body = body.decode("utf-8", errors="replace")
    if isinstance(body, str):
        try:
            return json.loads(body)
        except ValueError:
            return body  # not JSON: echo the text
    return body


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    """TorchServe entry point: one answer per request of the batch."""
    if data is None:  # TorchServe's initialization call
        return None
    return [_body(request) for request in data]
