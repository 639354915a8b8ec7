"""A process's footprint under load: its thread count and RSS, sampled, and the rows judging them.

"Flat" threads allow a little slack: a bounded pool (FastAPI's threadpool, a worker's own) may
still grow by a few threads meanwhile; waiting clients or calls in flight must add none.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from bench.machine import rss_mb, threads
from bench.table import Row

THREAD_SLACK = 4
SAMPLE_SECONDS = 0.2


@dataclass
class Sampler:
    """Samples an API process's thread count and RSS in a thread until stopped."""

    pid: int
    thread_counts: list[int] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _loop(self) -> None:
        while True:
            self.thread_counts.append(threads(self.pid))
            self.rss.append(rss_mb(self.pid))
            if self._stop.wait(SAMPLE_SECONDS):
                return

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._loop, name="api-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def footprint_rows(
    key: str,
    scenario: str,
    process: str,
    sampler: Sampler,
    threads_before: int,
    rss_before: float,
    rss_target_mb: float,
) -> list[Row]:
    """`<key>_threads` (flat) and `<key>_rss` (growth within `rss_target_mb`) of `process`."""
    threads_max, rss_max = max(sampler.thread_counts), max(sampler.rss)
    growth = max(0.0, rss_max - rss_before)
    return [
        Row(
            key=f"{key}_threads",
            scenario=scenario,
            measure=f"{process} threads (before -> max)",
            direct="-",
            dispatcher=f"{threads_before} -> {threads_max}",
            target="flat",
            met=threads_max <= threads_before + THREAD_SLACK,
            figures={"threads_before": threads_before, "threads_max": threads_max},
        ),
        Row(
            key=f"{key}_rss",
            scenario=scenario,
            measure=f"{process} RSS growth",
            direct="-",
            dispatcher=f"+{growth:.0f} MB ({rss_before:.0f} -> {rss_max:.0f})",
            target=f"<= {rss_target_mb:g} MB",
            met=growth <= rss_target_mb,
            figures={"rss_before_mb": rss_before, "rss_max_mb": rss_max},
        ),
    ]
