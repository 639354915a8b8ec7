"""The console's bounded figures: rates, failures by code and latency percentiles, no Prometheus.

Every script that submits, starts or ends a task adds to one hash per FIGURES_BUCKET_SECONDS of
time (`K.figures .. <bucket start>`, keys.py; lib.lua `count_figure`), in the same atomic step as
the transition, so the figures agree with the records and across every API process and worker.
Each hash expires FIGURES_KEEP_SECONDS after its last write: the memory they take depends on how
long they are kept (15 minutes of 10-second buckets), never on how many tasks pass.

Fields of a bucket (`<class>` is a Priority's value, `<bin>` an index into FIGURE_EDGES):

    submitted:<class>           tasks accepted (task_submit, batch_add_items)
    refused:<class>             submits refused with 429 because the class was full (task_submit)
    ended:<class>:<status>      endings by terminal status (lib.lua count_ending)
    code:<class>:<code>         failed and expired tasks by their error's code
    wait:<class>:<bin>          queue wait of a first start (task_start): started - created
    run:<class>:<bin>           run time of a task that ran and ended succeeded or failed
    e2e:<class>:<bin>           created to finished, for the same tasks
    backend:<name>:<bin>        run time by backend (the model server's latency and ours)

Durations go into fixed bins (FIGURE_EDGES, upper edges in seconds), so a percentile is read by
linear interpolation inside its bin: exact to the bin's width, as Prometheus's histogram_quantile.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from shared.redis_state.keys import (
    FIGURE_EDGES,
    FIGURES_BUCKET_SECONDS,
    FIGURES_KEEP_SECONDS,
    figures_key,
)

# What the console shows: 15 minutes of buckets (the charts), rates over 1 and 5 minutes.
CHART_SECONDS = 15 * 60
assert CHART_SECONDS <= FIGURES_KEEP_SECONDS - FIGURES_BUCKET_SECONDS


def bucket_start(now: float) -> int:
    """The start of the bucket holding time `now` (lib.lua count_figure computes the same)."""
    return math.floor(now / FIGURES_BUCKET_SECONDS) * FIGURES_BUCKET_SECONDS


def bin_of(seconds: float) -> int:
    """The histogram bin of a duration, as lib.lua count_duration picks it."""
    return bisect.bisect_left(FIGURE_EDGES, seconds)


def percentile(bins: Mapping[int, int], q: float) -> float | None:
    """The q-quantile (0..1) of a histogram {bin: count}, interpolated inside its bin; None when
    empty. A quantile in the last bin (above every edge) reads as the last edge."""
    total = sum(bins.values())
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index in range(len(FIGURE_EDGES) + 1):
        count = bins.get(index, 0)
        if count and seen + count >= rank:
            if index == len(FIGURE_EDGES):
                return FIGURE_EDGES[-1]
            low = FIGURE_EDGES[index - 1] if index else 0.0
            return low + (FIGURE_EDGES[index] - low) * max(rank - seen, 0) / count
        seen += count
    return FIGURE_EDGES[-1]


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket's counters as read."""

    start: int
    counts: Mapping[str, int]

    def histogram(self, name: str) -> dict[int, int]:
        """The bins of histogram `name` ('e2e:interactive', 'backend:torchserve', ...)."""
        prefix = name + ":"
        return {
            int(key[len(prefix) :]): value
            for key, value in self.counts.items()
            if key.startswith(prefix) and key[len(prefix) :].isdigit()
        }


@dataclass(frozen=True, slots=True)
class Window:
    """The buckets of the last CHART_SECONDS up to `now`, oldest first (missing ones empty)."""

    now: float
    buckets: Sequence[Bucket] = field(default_factory=tuple)

    def recent(self, seconds: float) -> list[Bucket]:
        """The buckets that started within the last `seconds`."""
        since = self.now - seconds
        return [b for b in self.buckets if b.start + FIGURES_BUCKET_SECONDS > since]

    def total(self, name: str, seconds: float) -> int:
        return sum(b.counts.get(name, 0) for b in self.recent(seconds))

    def rate(self, name: str, seconds: float) -> float:
        """Per second over the last `seconds` (the current bucket counts pro rata)."""
        return self.total(name, seconds) / seconds

    def matching(self, prefix: str, seconds: float) -> Counter[str]:
        """The totals of the fields starting with `prefix`, by the rest of their name."""
        totals: Counter[str] = Counter()
        for b in self.recent(seconds):
            for key, value in b.counts.items():
                if key.startswith(prefix) and value:
                    totals[key[len(prefix) :]] += value
        return totals

    def histogram(self, name: str, seconds: float) -> dict[int, int]:
        merged: Counter[int] = Counter()
        for b in self.recent(seconds):
            merged.update(b.histogram(name))
        return dict(merged)

    def quantiles(
        self, name: str, seconds: float, qs: Iterable[float] = (0.5, 0.95, 0.99)
    ) -> list[float | None]:
        bins = self.histogram(name, seconds)
        return [percentile(bins, q) for q in qs]


async def read_window(client: aioredis.Redis, now: float, seconds: int = CHART_SECONDS) -> Window:
    """The buckets of the last `seconds`, in one pipeline of HGETALLs (at most 91)."""
    last = bucket_start(now)
    starts = list(range(last - seconds + FIGURES_BUCKET_SECONDS, last + 1, FIGURES_BUCKET_SECONDS))
    async with client.pipeline(transaction=False) as pipe:
        for start in starts:
            pipe.hgetall(figures_key(str(start)))
        replies = await pipe.execute()
    buckets = [
        Bucket(start, {_text(k): int(v) for k, v in (reply or {}).items()})
        for start, reply in zip(starts, replies, strict=True)
    ]
    return Window(now, tuple(buckets))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
