"""Test model: answers the tracing headers its request came with, as a handler reads them.

`{"x_request_id": ..., "traceparent": ...}` per request (None when absent): the dispatcher sends
X-Request-ID to TorchServe, and the worker's traced httpx client sends traceparent.
"""

from __future__ import annotations

from typing import Any

NAMES = {"x_request_id": "X-Request-ID", "traceparent": "traceparent"}


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    if data is None:
        return None
    return [
        {key: context.get_request_header(index, name) for key, name in NAMES.items()}
        for index in range(len(data))
    ]
