"""(7c) What the console's figures cost: Redis CPU per task, and sync throughput with and without.

First the microbenchmark of bench/figures_cost.py: the same tasks through the real task_submit,
task_start and task_finish on a redis-server of its own, alternating the shipped scripts with
copies whose figure helpers do nothing, and Redis's own CPU time per task (`INFO commandstats`).
No model server is involved: the "direct" column is the scripts without the figures.

Then the whole path: an API process and the run's worker set started twice over, alternately
as shipped and with the figure helpers emptied (PYTHONPATH=bench/no_figures, whose
sitecustomize swaps the loader's source before any script is registered), each side loaded with
the same wrk sync throughput run as (2). The figures' own counters tell the sides apart: a side
without them must add no submission to them, a side with them one per request, or the scenario
fails rather than report a comparison of two identical stacks.
"""

from __future__ import annotations

import time
from typing import cast

from bench.figures_cost import measure, summary
from bench.loadgen import WrkResult, run_wrk
from bench.progress import say
from bench.scenarios.context import TINY_DISPATCH_BODY, Context
from bench.scenarios.throughput import warm_up
from bench.table import Row, number
from shared.redis_state.figures import bucket_start
from shared.redis_state.keys import FIGURES_KEY_PREFIX
from tests.support.paths import REPO

# Target: the figures add at most this much Redis CPU to a task (its three scripts).
ADDED_USEC_TARGET = 40.0
# Target: sync throughput with the figures is within this fraction of the throughput without.
THROUGHPUT_LOSS_TARGET = 0.05
NO_FIGURES_ENV = {"PYTHONPATH": f"{REPO / 'bench' / 'no_figures'}:{REPO}"}


def run(ctx: Context) -> None:
    _script_cost(ctx)
    _sync_throughput(ctx)


def _script_cost(ctx: Context) -> None:
    tasks = 2_000 if ctx.plan.smoke else 20_000
    say(f"figures: {tasks} tasks a round through the scripts, with and without the figures ...")
    shipped, bare = measure(tasks=tasks, rounds=1 if ctx.plan.smoke else 3)
    with_figures, without = summary(shipped, bare)
    added = with_figures - without
    say(f"  {without:.1f} -> {with_figures:.1f} us of Redis CPU per task (+{added:.1f} us)")
    ctx.rows.append(
        Row(
            key="figures_cost",
            scenario="console figures: a task's scripts (submit, start, finish), 16 a call",
            measure="Redis CPU per task (best round); direct = the scripts without figures",
            direct=f"{without:.1f} us",
            dispatcher=f"{with_figures:.1f} us (+{added:.1f})",
            ratio=f"{with_figures / without:.2f}" if without else "-",
            target=f"+<= {ADDED_USEC_TARGET:g} us",
            met=added <= ADDED_USEC_TARGET,
            figures={"without_usec": without, "with_usec": with_figures},
        )
    )


def _sync_throughput(ctx: Context) -> None:
    ctx.stop_workers()  # each side's own workers, and only they, take its tasks
    rounds = 1 if ctx.plan.smoke else 2
    rates: dict[bool, list[float]] = {False: [], True: []}
    for n in range(rounds):
        for figures in (False, True):
            result = _side(ctx, figures, n)
            rates[figures].append(result.rate())
    without, shipped = (sum(rates[f]) / len(rates[f]) for f in (False, True))
    loss = 1 - shipped / without if without else 0.0
    say(f"  sync throughput: {number(without)} req/s without figures, {number(shipped)} with")
    ctx.notes.append(
        "Console figures, sync throughput per round (req/s): without "
        + ", ".join(number(r) for r in rates[False])
        + "; with "
        + ", ".join(number(r) for r in rates[True])
        + " (alternated, without first)."
    )
    ctx.rows.append(
        Row(
            key="figures_throughput",
            scenario=f"console figures: sync throughput, {ctx.plan.connections} connections, "
            f"tiny model, {rounds} alternated round(s) a side",
            measure="req/s (200s only, mean); direct = the same stack without figures",
            direct=f"{number(without)} req/s",
            dispatcher=f"{number(shipped)} req/s ({-loss:+.1%} vs without)",
            ratio=f"{shipped / without:.2f}" if without else "-",
            target=f"loss <= {THROUGHPUT_LOSS_TARGET:.0%}",
            met=loss <= THROUGHPUT_LOSS_TARGET,
            figures={"without_rps": without, "with_rps": shipped},
        )
    )


def _side(ctx: Context, figures: bool, n: int) -> WrkResult:
    """One API process and the run's worker set, as shipped or without figures, under wrk."""
    plan, stack = ctx.plan, ctx.stack
    env = {} if figures else NO_FIGURES_ENV
    side = "with" if figures else "without"
    say(f"figures: sync throughput {side} figures (round {n + 1}) ...")
    api = stack.start_api(1, env=env, name=f"figures-{side}-{n + 1}")
    workers = stack.start_workers(plan.workers, plan.concurrency, plan.pool, env=env)
    try:
        url = f"{api.url}/dispatch_model"
        warm_up(url)
        since = bucket_start(time.time())
        before = _submissions_counted(ctx, since)
        result = run_wrk(
            url, TINY_DISPATCH_BODY, connections=plan.connections, seconds=plan.wrk_seconds
        )
        counted = _submissions_counted(ctx, since) - before
    finally:
        api.stop()
        stack.stop_workers(workers)
    say(f"  {result.describe()}; the figures counted {counted} submissions")
    answered = result.statuses.get(200, 0)
    if not figures and counted:
        raise RuntimeError(f"the side without figures counted {counted} submissions")
    if figures and counted < answered:
        raise RuntimeError(f"the side with figures counted {counted} of {answered} submissions")
    return result


def _submissions_counted(ctx: Context, since: int) -> int:
    """Every `submitted:<class>` count in the figures' buckets from `since` on (older ones may
    expire during the run)."""
    with ctx.stack.client() as client:
        total = 0
        for key in client.scan_iter(f"{FIGURES_KEY_PREFIX}*", count=1000):
            if int(key.removeprefix(FIGURES_KEY_PREFIX)) < since:
                continue
            fields = cast(dict[str, str], client.hgetall(key))
            total += sum(int(v) for f, v in fields.items() if f.startswith("submitted:"))
        return total
