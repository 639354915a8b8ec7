"""Test model: answers the bytes it received (the `data` part or the raw body) unchanged, with
the content type they came with, so binary answers can be checked byte for byte."""

from __future__ import annotations

from typing import Any


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    if data is None:
        return None
    answers = []
    for index, request in enumerate(data):
        name = "data" if "data" in request else "body"
        header = context.get_request_header(index, name)
        content_type = header.get("content-type") if isinstance(header, dict) else None
        if content_type:
            context.set_response_content_type(index, content_type)
        value = request[name]
        answers.append(bytes(value) if isinstance(value, bytearray) else value)
    return answers
