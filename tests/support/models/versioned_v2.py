"""Test model: version 2.0 of `versioned`; says which version answered."""

from __future__ import annotations

from typing import Any

from payload import json_body

VERSION = "2.0"


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    if data is None:
        return None
    return [{"version": VERSION, "echo": json_body(request)} for request in data]
