"""Test model: appends one line per request to $COUNTING_MODEL_LOG and answers the line count.

Tests read that file to prove what reached TorchServe (e.g. that a canceled task never did).
TorchServe's model workers inherit the frontend's environment, which sets the variable.
"""

from __future__ import annotations

import json
import os
from typing import Any

from _payload import json_body

LOG_ENV = "COUNTING_MODEL_LOG"


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
    return [{"count": _record(json_body(request))} for request in data]
