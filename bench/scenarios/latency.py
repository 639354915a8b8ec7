"""(1) Latency for one client on the tiny model: sequential requests, direct and dispatched."""

from __future__ import annotations

import statistics
from datetime import datetime

import httpx

from bench.progress import say
from bench.scenarios.context import TINY_INPUT, Context
from bench.sequential import Latencies, measure
from bench.stack import TINY_MODEL
from bench.table import Row

P50_OVERHEAD_TARGET_MS = 2.0
SCENARIO = "latency, 1 client, tiny model"
BREAKDOWN_LEGEND = (
    "pickup = API accepted -> worker started (enqueue + Celery delivery); run = worker START "
    "script + TorchServe call + FINISH script; rest = the client's total minus both (HTTP, the "
    "API's submit, waking on the publish, reading the record, the response)."
)


def _row(
    q: int,
    direct: Latencies,
    ours: Latencies,
    ratio: str,
    *,
    target: str = "report",
    met: bool | None = None,
) -> Row:
    """The table row of the `q`th percentile, direct and through the dispatcher."""
    direct_ms, ours_ms = direct.percentile(q), ours.percentile(q)
    return Row(
        key=f"latency_p{q}",
        scenario=SCENARIO,
        measure=f"p{q}",
        direct=f"{direct_ms:.2f} ms",
        dispatcher=f"{ours_ms:.2f} ms",
        ratio=ratio,
        target=target,
        met=met,
        figures={"direct_ms": direct_ms, "dispatcher_ms": ours_ms},
    )


class Breakdown:
    """Where a sync request's time goes, from the task record's timestamps (BREAKDOWN_LEGEND)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[float]] = {"pickup": [], "run": [], "rest": []}

    def __call__(self, response: httpx.Response, elapsed_ms: float) -> None:
        body = response.json()
        created, started, finished = (
            datetime.fromisoformat(body[name]).timestamp()
            for name in ("created_at", "started_at", "finished_at")
        )
        self.parts["pickup"].append((started - created) * 1000)
        self.parts["run"].append((finished - started) * 1000)
        self.parts["rest"].append(elapsed_ms - (finished - created) * 1000)

    def describe(self) -> str:
        return ", ".join(
            f"{name} {statistics.median(values):.2f} ms" for name, values in self.parts.items()
        )


def run(ctx: Context) -> None:
    plan, stack = ctx.plan, ctx.stack
    count = plan.latency_requests
    say(f"latency: direct TorchServe, {count} sequential requests ...")
    direct = measure(
        stack.predictions_url(TINY_MODEL),
        TINY_INPUT,
        requests=count,
        warmup=plan.latency_warmup,
    )
    say(f"latency: dispatcher (sync /dispatch_model), {count} sequential requests ...")
    breakdown = Breakdown()
    ours = measure(
        stack.dispatch_url(),
        {"model_name": TINY_MODEL, "input": TINY_INPUT},
        requests=count,
        warmup=plan.latency_warmup,
        inspect=breakdown,
    )
    p50_overhead = ours.p50 - direct.p50
    p99_overhead = ours.p99 - direct.p99
    say(
        f"  direct p50 {direct.p50:.2f} / p99 {direct.p99:.2f} ms; "
        f"dispatcher p50 {ours.p50:.2f} / p99 {ours.p99:.2f} ms"
    )
    say(f"  dispatcher breakdown (medians): {breakdown.describe()}")
    ctx.notes.append(
        f"Latency breakdown of a sync dispatch (medians, from the task records): "
        f"{breakdown.describe()}; direct TorchServe p50 {direct.p50:.2f} ms. {BREAKDOWN_LEGEND}"
    )
    failures = direct.failures + ours.failures
    if failures:
        ctx.notes.append(f"Latency: {failures} requests failed and were left out of the timings.")
    ctx.rows += [
        _row(
            50,
            direct,
            ours,
            f"+{p50_overhead:.2f} ms",
            target=f"overhead <= {P50_OVERHEAD_TARGET_MS:g} ms",
            met=p50_overhead <= P50_OVERHEAD_TARGET_MS,
        ),
        _row(99, direct, ours, f"{p99_overhead:+.2f} ms"),
    ]
