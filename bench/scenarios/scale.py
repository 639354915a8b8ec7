"""(6) Horizontal scale: throughput with 1, 2 and 4 worker processes, TorchServe not the limit.

TorchServe gets `scale_torchserve_workers` workers for the slow model (8: 400 req/s) and each
Celery worker a small fixed number of calls in flight (`WORKER_MAX_IN_FLIGHT`), so the Celery
workers are what limits throughput.
"""

from __future__ import annotations

import time

from bench.loadgen import WrkResult, run_wrk
from bench.progress import say
from bench.scenarios.context import SLOW_DISPATCH_BODY, SLOW_SECONDS, Context
from bench.table import Row, number
from devstack import wait_until

TARGETS = {2: 1.9, 4: 3.6}
DRAIN_TIMEOUT = 60.0


def _drain(ctx: Context) -> None:
    """Let tasks of abandoned requests (wrk stops mid-flight) finish before the next count."""
    with ctx.stack.client() as client:
        wait_until(lambda: client.llen("dispatch") == 0, DRAIN_TIMEOUT, "queue to drain", 0.1)
    time.sleep(0.5)


def _measure(ctx: Context, workers: int, connections: int) -> WrkResult:
    plan = ctx.plan
    say(
        f"scale: {workers} worker(s) x {plan.pool} {plan.scale_concurrency}, wrk {connections} "
        f"connections, {plan.scale_seconds:g} s ..."
    )
    result = run_wrk(
        ctx.stack.dispatch_url(),
        SLOW_DISPATCH_BODY,
        connections=connections,
        seconds=plan.scale_seconds,
    )
    say(f"  {result.describe()}")
    _drain(ctx)
    return result


def run(ctx: Context) -> None:
    plan, stack = ctx.plan, ctx.stack
    counts = sorted(plan.scale_worker_counts, reverse=True)
    ctx.stop_workers()
    ts_workers = plan.scale_torchserve_workers
    say(
        f"scale: TorchServe {ts_workers} workers for the slow model; starting {counts[0]} "
        f"Celery workers ({plan.pool} x {plan.scale_concurrency}) ..."
    )
    stack.scale_slow(ts_workers)
    # Each worker makes at most `scale_concurrency` calls at once (its engine's slots), so the
    # workers, not TorchServe, are what bounds throughput.
    slots = {"WORKER_MAX_IN_FLIGHT": str(plan.scale_concurrency)}
    ctx.workers = stack.start_workers(counts[0], plan.scale_concurrency, plan.pool, env=slots)
    # Enough connections to keep the most workers busy; the same for every count.
    connections = max(8, 4 * counts[0] * plan.scale_concurrency)
    rates: dict[int, float] = {}
    for count in counts:
        while len(ctx.workers) > count:  # fewer workers: stop the surplus (warm shutdown)
            stack.stop_workers([ctx.workers.pop()])
        rates[count] = _measure(ctx, count, connections).rate()
    ctx.stop_workers()
    stack.scale_slow(plan.slow_workers)
    base = rates[min(rates)]
    figures = ", ".join(f"{count}: {number(rate)} req/s" for count, rate in sorted(rates.items()))
    torchserve = f"capacity {number(ts_workers / SLOW_SECONDS)} req/s ({ts_workers} workers)"
    for count, target in TARGETS.items():
        if count not in rates:
            continue
        ratio = rates[count] / base
        ctx.rows.append(
            Row(
                key=f"scale_{count}",
                scenario=(
                    f"horizontal scale, slow model, {plan.pool} x {plan.scale_concurrency} "
                    "per worker"
                ),
                measure=f"req/s with {count} workers / 1",
                direct=torchserve,
                dispatcher=figures,
                ratio=f"{ratio:.2f}",
                target=f">= {target:g}",
                met=ratio >= target,
                figures={"base_rps": base, f"rps_{count}": rates[count]},
            )
        )
