"""Echo demo model: answers every request with the JSON body it received, unchanged."""

from __future__ import annotations

from typing import Any

from payload import json_body


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    """TorchServe entry point: one answer per request of the batch."""
    if data is None:  # TorchServe's initialization call
        return None
    return [json_body(request) for request in data]
