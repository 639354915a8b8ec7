"""What every scenario gets: the plan, the running stack, and where results go."""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from bench.machine import children_cpu_seconds, cpu_used, group_cpu_seconds
from bench.plan import Plan
from bench.progress import say
from bench.stack import SLOW_MODEL, TINY_MODEL, BenchStack
from bench.table import Row
from devstack import CeleryWorker

_PROBLEM = re.compile(r"WARNING|ERROR|CRITICAL|Traceback")
_NOISE = re.compile(r"^\[[^]]*\]\s*|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _normalize(line: str) -> str:
    """A log line without its timestamp prefix and task ids, so repeats count as one message."""
    return _NOISE.sub("", line).strip()[:160]


TINY_INPUT: dict[str, Any] = {"hello": "world"}
SLOW_INPUT: dict[str, Any] = {"n": 1}
# Seconds per request of the slow model (bench/models/slow20.py).
SLOW_SECONDS = 0.020
TORCHSERVE = "TorchServe (frontend + model workers)"


def dispatch_body(model: str, value: Any) -> str:
    return json.dumps({"model_name": model, "input": value})


TINY_DIRECT_BODY = json.dumps(TINY_INPUT)
TINY_DISPATCH_BODY = dispatch_body(TINY_MODEL, TINY_INPUT)
SLOW_DIRECT_BODY = json.dumps(SLOW_INPUT)
SLOW_DISPATCH_BODY = dispatch_body(SLOW_MODEL, SLOW_INPUT)


@dataclass
class Context:
    """Shared state of one run: scenarios append rows, notes and profile lines."""

    plan: Plan
    stack: BenchStack
    run_dir: Path
    workers: list[CeleryWorker] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profile: list[str] = field(default_factory=list)

    @property
    def machine_cores(self) -> int:
        return os.cpu_count() or 1

    def processes(self) -> dict[str, int]:
        """Process-group ids of the stack's services, by a short name."""
        groups = {
            "API": self.stack.api_server.pid,
            TORCHSERVE: self.stack.torchserve.pid,
            "redis-server": self.stack.redis.pid,
        }
        for index, worker in enumerate(self.workers, 1):
            groups[f"Celery worker {index}"] = worker.pid
        return groups

    def own_processes(self) -> list[str]:
        """The dispatcher's own services in `processes()`: the API, the workers, redis-server."""
        return [name for name in self.processes() if name != TORCHSERVE]

    def log_mark(self) -> dict[Path, int]:
        """Sizes of the stack's log files now, to read only what a scenario adds to them."""
        return {path: path.stat().st_size for path in (self.run_dir / "logs").glob("*.log")}

    def log_problems(self, mark: dict[Path, int]) -> str:
        """Warnings and errors logged since `mark`, counted by message (ids and times removed)."""
        counts: Counter[str] = Counter()
        for path in sorted((self.run_dir / "logs").glob("*.log")):
            with path.open("rb") as log:
                log.seek(mark.get(path, 0))
                text = log.read().decode(errors="replace")
            for line in text.splitlines():
                if _PROBLEM.search(line):
                    counts[f"{path.stem}: {_normalize(line)}"] += 1
        return "; ".join(f"{count} x {message}" for message, count in counts.most_common(5))

    def report_log_problems(self, mark: dict[Path, int], scenario: str) -> None:
        """Say and note (under `scenario`) the warnings and errors logged since `mark`, if any."""
        problems = self.log_problems(mark)
        if problems:
            say(f"  logged: {problems}")
            self.notes.append(f"{scenario}: the stack logged {problems}.")

    def stop_workers(self) -> None:
        self.stack.stop_workers(self.workers)
        self.workers = []


class CpuMeter:
    """CPU use of each service (and of wrk, via reaped children) over a `with` block.

    Shares are in percent of one core; on a 2-core machine they add up to at most 200%.
    """

    def __init__(self, groups: dict[str, int]) -> None:
        self.groups = groups
        self.shares: dict[str, float] = {}

    def __enter__(self) -> Self:
        self._began = time.monotonic()
        self._before = {name: group_cpu_seconds(pid) for name, pid in self.groups.items()}
        self._children = children_cpu_seconds()
        return self

    def __exit__(self, *_: object) -> None:
        wall = time.monotonic() - self._began
        for name, pid in self.groups.items():
            used = cpu_used(self._before[name], group_cpu_seconds(pid))
            self.shares[name] = used / wall * 100
        self.shares["load generator (wrk)"] = (children_cpu_seconds() - self._children) / wall * 100

    def describe(self) -> str:
        busiest = sorted(self.shares.items(), key=lambda item: -item[1])
        return ", ".join(f"{name} {share:.0f}%" for name, share in busiest)

    def ms_per_request(self, rate: float, names: list[str]) -> float:
        """CPU milliseconds the services `names` spent together per request, at `rate` req/s."""
        return sum(self.shares[name] for name in names) * 10 / rate

    def per_request(self, rate: float) -> str:
        """CPU milliseconds each served request cost every service, at `rate` requests/s.

        On a CPU-bound machine this is what decides throughput: cores * 1000 / total ms.
        """
        costs = {name: share * 10 / rate for name, share in self.shares.items() if share >= 0.5}
        total = sum(costs.values())
        parts = ", ".join(
            f"{name} {ms:.2f}" for name, ms in sorted(costs.items(), key=lambda item: -item[1])
        )
        return f"{total:.2f} ms in all: {parts}"
