"""Benchmark model: sleeps 20 ms per request, then echoes the JSON body.

With 2 TorchServe workers its capacity is 2 / 0.020 s = 100 requests per second: the yardstick
of the burst and waiting-clients scenarios.
"""

from __future__ import annotations

import time
from typing import Any

from payload import json_body

SLEEP_SECONDS = 0.020


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    """TorchServe entry point: one answer per request of the batch, 20 ms each."""
    if data is None:  # TorchServe's initialization call
        return None
    answers = []
    for request in data:
        time.sleep(SLEEP_SECONDS)
        answers.append(json_body(request))
    return answers
