"""Test model: appends one line per request to $COUNTING_MODEL_LOG and answers the line count.

Tests read that file to prove what reached TorchServe (e.g. that a canceled task never did).
TorchServe's model workers inherit the frontend's environment, which sets the variable.
A JSON object body with `"sleep": seconds` (at most 30) is logged first, then answered that late.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from payload import json_body

LOG_ENV = "COUNTING_MODEL_LOG"
MAX_SLEEP = 30.0


def _record(body: Any) -> int:
    path = os.environ[LOG_ENV]
    # One write of one line per request on an O_APPEND file: lines never interleave.
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps(body, sort_keys=True) + "\n")
    with open(path, encoding="utf-8") as log:
        return sum(1 for _ in log)


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    if data is None:
        return None
    answers = []
    for request in data:
        body = json_body(request)
        count = _record(body)  # on arrival: a request that is cut short still counts
        if isinstance(body, dict) and isinstance(body.get("sleep"), int | float):
            time.sleep(min(max(float(body["sleep"]), 0.0), MAX_SLEEP))
        answers.append({"count": count})
    return answers
