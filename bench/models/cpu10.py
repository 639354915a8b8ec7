"""Benchmark model: burns about 10 ms of one core per request in torch, then echoes the body.

The yardstick of the CPU-model scenario: on a CPU-served model every millisecond of CPU the
dispatcher spends is taken from the model, so dispatched / direct throughput shows what the
queue costs a real model. The work is float32 matrix products on one torch thread (as a served
model runs one intra-op thread per worker); how many products make 10 ms is measured when the
worker starts, with the thread's own CPU clock, so the cost is the same on a slow machine.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from payload import json_body

CPU_SECONDS = 0.010
SIZE = 96
CALIBRATION_SECONDS = 0.2
_products = 1


def _burn(products: int) -> float:
    matrix = torch.rand(SIZE, SIZE)
    for _ in range(products):
        matrix = torch.tanh(matrix @ matrix)  # tanh keeps the values bounded
    return float(matrix[0, 0])


def _calibrate() -> int:
    torch.set_num_threads(1)
    products = 16
    while True:
        started = time.thread_time()
        _burn(products)
        used = time.thread_time() - started
        if used >= CALIBRATION_SECONDS:
            return max(1, round(products * CPU_SECONDS / used))
        products *= 2


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    """TorchServe entry point: one answer per request of the batch, ~10 ms of CPU each."""
    global _products
    if data is None:  # TorchServe's initialization call
        _products = _calibrate()
        return None
    answers = []
    for request in data:
        _burn(_products)
        answers.append(json_body(request))
    return answers
