"""What the console's figures cost per task: Redis CPU of a task's scripts with and without them.

Every task passes three scripts (task_submit, task_start, task_finish), and each now also adds to
the figures (lib.lua count_figure, count_duration, count_ending; task_submit's and task_start's
own calls). This microbenchmark runs the same tasks through the real scripts on a redis-server of
its own twice, in alternating rounds: as shipped, and with those helpers' bodies emptied (the
scripts otherwise unchanged), and reads Redis's own CPU time of the scripts (`INFO commandstats`,
`cmdstat_evalsha`) per task. Redis runs every script on its one thread, so that time is what the
figures take from the dispatcher's throughput ceiling.

    .venv/bin/python -m bench.figures_cost            # 20,000 tasks a round, 3 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import redis.asyncio as aioredis

from devstack.redis import RedisServer
from shared.errors import DeadlineExceeded, ModelNotFound, TaskExpired
from shared.priorities import Priority, queue_of
from shared.redis_state import loader
from shared.redis_state.record import NewTask, Outcome
from shared.redis_state.task_scripts import (
    FinishTasks,
    StartTasks,
    StartTerms,
    SubmitTask,
    SubmitTasks,
)

FIGURE_HELPERS = ("count_figure", "count_duration", "count_ending")
GROUP = 16  # tasks per script call: one full Celery message
TTL = 600


def without_figures(name: str) -> str:
    """Script `name` as the loader builds it, with the figure helpers' bodies emptied."""
    text = _original_source(name)
    for helper in FIGURE_HELPERS:
        text = re.sub(
            rf"^(local function {helper}\([^)]*\)\n)(.*?)^end$",
            r"\1  do return end\nend",
            text,
            count=1,
            flags=re.MULTILINE | re.DOTALL,
        )
    return text


_original_source = loader.source


@contextmanager
def variant(figures: bool) -> Iterator[None]:
    if figures:
        yield
        return
    with mock.patch.object(loader, "source", without_figures):
        yield


@dataclass(frozen=True, slots=True)
class Round:
    figures: bool
    tasks: int
    script_usec: float  # Redis CPU time of every EVALSHA of the round
    wall_seconds: float

    @property
    def usec_per_task(self) -> float:
        return self.script_usec / self.tasks


async def _lifecycles(client: aioredis.Redis, tasks: int, tag: str) -> None:
    submit, start, finish = SubmitTasks(client), StartTasks(client), FinishTasks(client)
    expired = TaskExpired("expired").body().model_dump_json()
    overran = DeadlineExceeded("overran").body().model_dump_json()
    terms = StartTerms(3, TTL, "bench@host", expired, overran)
    classes = list(Priority)
    for first in range(0, tasks, GROUP):
        now = time.time()
        group = []
        for i in range(first, min(first + GROUP, tasks)):
            priority = classes[i % len(classes)]
            new = NewTask("echo", None, "http://127.0.0.1:1", now + 600, priority)
            group.append(SubmitTask(f"{tag}-{i}", queue_of(priority), new.fields(now, "")))
        messages = {t.queue: "[]" for t in group}
        await submit(group, messages, max_depth=10**9, ttl=TTL, idempotency_ttl=TTL)
        ids = [t.task_id for t in group]
        await start(ids, terms, time.time())
        outcomes = [
            Outcome.failed(i, ModelNotFound("x")) if n % 20 == 0 else Outcome.succeeded(i, 1)
            for n, i in enumerate(ids)
        ]
        await finish(outcomes, now=time.time(), ttl=TTL)


async def _round(url: str, figures: bool, tasks: int, tag: str) -> Round:
    with variant(figures):
        async with aioredis.Redis.from_url(url) as client:
            await client.flushall()
            await client.config_resetstat()
            began = time.perf_counter()
            await _lifecycles(client, tasks, tag)
            wall = time.perf_counter() - began
            stats = await client.info("commandstats")
    usec = float(stats.get("cmdstat_evalsha", {}).get("usec", 0))
    return Round(figures, tasks, usec, wall)


def measure(tasks: int = 20_000, rounds: int = 3) -> tuple[list[Round], list[Round]]:
    """(with figures, without) rounds, alternated on one redis-server (no AOF: the CPU of the
    scripts alone)."""
    with (
        tempfile.TemporaryDirectory() as workdir,
        RedisServer(Path(workdir), appendonly=False) as s,
    ):
        shipped: list[Round] = []
        bare: list[Round] = []
        for n in range(rounds):
            bare.append(asyncio.run(_round(s.url, False, tasks, f"b{n}")))
            shipped.append(asyncio.run(_round(s.url, True, tasks, f"f{n}")))
    return shipped, bare


def summary(shipped: list[Round], bare: list[Round]) -> tuple[float, float]:
    """The best round of each (the least disturbed by the rest of the machine): usec per task."""
    return min(r.usec_per_task for r in shipped), min(r.usec_per_task for r in bare)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    shipped, bare = measure(args.tasks, args.rounds)
    for r in (*bare, *shipped):
        label = "with figures" if r.figures else "without     "
        print(f"{label}: {r.usec_per_task:6.1f} us of Redis CPU per task ({r.wall_seconds:.1f} s)")
    with_f, without = summary(shipped, bare)
    print(
        f"best: {without:.1f} -> {with_f:.1f} us per task (+{with_f - without:.1f} us, "
        f"{with_f / without:.2f}x the scripts' time without figures)"
    )


if __name__ == "__main__":
    main()
