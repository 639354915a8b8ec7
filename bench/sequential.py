"""One client, one request at a time: the latency a lone caller sees (httpx, keep-alive)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Latencies:
    """Per-request latencies in milliseconds, in the order they were measured."""

    samples_ms: list[float]
    failures: int

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile (q in 0..100) of the samples."""
        ordered = sorted(self.samples_ms)
        rank = max(1, round(q / 100 * len(ordered)))
        return ordered[min(rank, len(ordered)) - 1]

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p99(self) -> float:
        return self.percentile(99)


def measure(
    url: str,
    body: Any,
    *,
    requests: int,
    warmup: int,
    headers: Mapping[str, str] | None = None,
    expect: int = 200,
    timeout: float = 30.0,
    inspect: Callable[[httpx.Response, float], None] | None = None,
    budget: float = 120.0,
) -> Latencies:
    """POST `body` `warmup + requests` times in a row; time the last `requests` of them.

    Stops early after `budget` seconds (a stalled stack must not stall the run).
    `inspect(response, elapsed_ms)` sees every measured successful response.
    """
    samples: list[float] = []
    failures = 0
    last_status = 0
    give_up = time.monotonic() + budget
    with httpx.Client(timeout=timeout, trust_env=False, headers=dict(headers or {})) as client:
        for index in range(warmup + requests):
            if time.monotonic() > give_up:
                break
            began = time.perf_counter()
            response = client.post(url, json=body)
            elapsed_ms = (time.perf_counter() - began) * 1000
            last_status = response.status_code
            if index < warmup:
                continue
            if response.status_code == expect:
                samples.append(elapsed_ms)
                if inspect is not None:
                    inspect(response, elapsed_ms)
            else:
                failures += 1
    if not samples:
        raise RuntimeError(f"no request to {url} succeeded in time (last status {last_status})")
    return Latencies(samples, failures)
