"""(4) A burst of requests at once on the slow model: TorchServe's queue overflows, ours does not.

The slow model serves 20 ms per request on `slow_workers` TorchServe workers, so its capacity is
workers / 20 ms (100 req/s for 2) and the ideal time to serve N requests is N / capacity.
"""

from __future__ import annotations

from bench.loadgen import run_wrk
from bench.progress import say
from bench.scenarios.context import (
    SLOW_DIRECT_BODY,
    SLOW_DISPATCH_BODY,
    SLOW_SECONDS,
    Context,
)
from bench.shots import Volley, VolleyResult, fire
from bench.stack import JOB_QUEUE_SIZE, SLOW_MODEL
from bench.table import Row, number

CAPACITY_TARGET = 0.97  # of TorchServe's measured capacity
SERVICE_UNAVAILABLE = 503
# Connections per TorchServe worker for measuring what the model really serves: enough to keep
# every worker busy, far below job_queue_size so nothing is rejected.
CAPACITY_CONNECTIONS_PER_WORKER = 4


def wait_bound(requests: int, capacity: float) -> float:
    """Seconds a client may wait: well beyond the ideal drain time, so waits never run out."""
    return round(3 * requests / capacity + 30)


def _summary(result: VolleyResult) -> str:
    statuses = dict(sorted(result.statuses.items()))
    errors = dict(result.errors)
    return f"statuses {statuses}{f', errors {errors}' if errors else ''}, {result.span:.1f} s"


def measured_capacity(ctx: Context) -> float:
    """Requests per second TorchServe really serves on the slow model, without overflow."""
    plan = ctx.plan
    connections = CAPACITY_CONNECTIONS_PER_WORKER * plan.slow_workers
    say(
        f"burst: TorchServe's real capacity on {SLOW_MODEL}: wrk {connections} connections, "
        f"{plan.wrk_seconds:g} s ..."
    )
    result = run_wrk(
        ctx.stack.predictions_url(SLOW_MODEL),
        SLOW_DIRECT_BODY,
        connections=connections,
        seconds=plan.wrk_seconds,
    )
    say(f"  {result.describe()}")
    return result.rate()


def run(ctx: Context) -> None:
    plan, stack = ctx.plan, ctx.stack
    real_capacity = measured_capacity(ctx)
    count = plan.burst_requests
    capacity = plan.slow_workers / SLOW_SECONDS
    ideal = count / capacity
    wait = wait_bound(count, capacity)
    say(
        f"burst: {count} requests at once, direct to TorchServe ({plan.slow_workers} workers, "
        f"job_queue_size {JOB_QUEUE_SIZE}) ..."
    )
    direct = fire(
        Volley(stack.predictions_url(SLOW_MODEL), SLOW_DIRECT_BODY.encode(), count, timeout=wait),
        plan.client_processes,
    )
    say(f"  {_summary(direct)}")
    say(f"burst: {count} requests at once, dispatcher (sync, Prefer: wait={wait:g}) ...")
    mark = ctx.log_mark()
    ours = fire(
        Volley(
            stack.dispatch_url(),
            SLOW_DISPATCH_BODY.encode(),
            count,
            headers=(("Prefer", f"wait={wait:g}"),),
            timeout=wait + 15,
        ),
        plan.client_processes,
    )
    say(f"  {_summary(ours)}")
    ctx.report_log_problems(mark, "Burst")
    rejected = direct.count(SERVICE_UNAVAILABLE)
    direct_failed = count - direct.count(200)
    ours_failed = count - ours.count(200)
    capacity_ratio = ideal / ours.span
    # The drain is judged against what TorchServe really serves on this machine (measured
    # above without overflow), not the model's nominal 20 ms.
    measured_ratio = count / ours.span / real_capacity
    scenario = f"burst, {number(count)} at once, slow model (20 ms, {plan.slow_workers} TS workers)"
    ctx.rows += [
        Row(
            key="burst_failures",
            scenario=scenario,
            measure="failed requests",
            direct=f"{number(direct_failed)} of {number(count)} ({number(rejected)} x 503)",
            dispatcher=f"{number(ours_failed)} of {number(count)}",
            target="direct: report; ours: 0",
            met=ours_failed == 0,
            figures={"dispatcher_succeeded": ours.count(200), "requests": count},
        ),
        Row(
            key="burst_drain",
            scenario=scenario,
            measure=f"time to serve all / ideal {ideal:.1f} s",
            direct=(
                f"{direct.span:.1f} s ({number(direct.count(200))} served); no overflow: "
                f"{number(real_capacity)} req/s = {real_capacity / capacity:.2f} of capacity"
            ),
            dispatcher=f"{ours.span:.1f} s",
            ratio=(
                f"{measured_ratio:.2f} of TorchServe's measured capacity "
                f"({capacity_ratio:.2f} of the ideal)"
            ),
            target=f">= {CAPACITY_TARGET:g} of measured capacity",
            met=measured_ratio >= CAPACITY_TARGET and ours_failed == 0,
            figures={
                "dispatcher_seconds": ours.span,
                "capacity_ratio": capacity_ratio,
                "measured_capacity_ratio": measured_ratio,
                "torchserve_rps": real_capacity,
            },
        ),
    ]
