"""Test model: sleeps `body["sleep"]` seconds (default 0.5, at most 30), then answers."""

from __future__ import annotations

import time
from typing import Any

from payload import json_body

DEFAULT_SLEEP = 0.5
MAX_SLEEP = 30.0


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    if data is None:
        return None
    answers = []
    for request in data:
        body = json_body(request)
        requested = body.get("sleep", DEFAULT_SLEEP) if isinstance(body, dict) else DEFAULT_SLEEP
        seconds = min(max(float(requested), 0.0), MAX_SLEEP)
        time.sleep(seconds)
        answers.append({"slept": seconds, "echo": body})
    return answers
