"""Test model: the sha256 of exactly what each request's parts carried, to compare with what
was sent. Per part (`body` for a raw body, the part names of multipart): sha256, size, the
Python type TorchServe handed over and the part's content type as TorchServe saw it.

str (text/*) is hashed as its UTF-8 bytes; JSON (application/json) as compact sorted JSON.
A part named `sleep` (seconds, at most 30) makes it answer that late, for worker-kill tests.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

MAX_SLEEP = 30.0


def _bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")


def _content_type(context: Any, index: int, name: str) -> str | None:
    header = context.get_request_header(index, name)
    return header.get("content-type") if isinstance(header, dict) else None


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    if data is None:
        return None
    answers = []
    for index, request in enumerate(data):
        parts = {}
        for name, value in request.items():
            raw = _bytes(value)
            parts[name] = {
                "sha256": hashlib.sha256(raw).hexdigest(),
                "size": len(raw),
                "type": type(value).__name__,
                "content_type": _content_type(context, index, name),
            }
        if "sleep" in request:
            time.sleep(min(float(_bytes(request["sleep"]).decode()), MAX_SLEEP))
        answers.append(parts)
    return answers
