"""(8) Mixed load: sync clients on the tiny model, alone and while a big batch runs.

What the priority classes promise under load: 64 sync clients (wrk, keep-alive) on `echo` for a
fixed time, once alone and once right after a 10,000-item batch was accepted, with the same workers
(the run's general workers plus one reserved for interactive work, as make run and the deployments
have). The batch's items go to the slow model (20 ms, 2 TorchServe workers, 100/s): they hold a
worker slot for as long as TorchServe takes, which is what priority classes must keep from delaying
sync callers. Items on `echo` itself would queue together with the sync requests inside TorchServe's
FIFO for that model, where no dispatcher priority reaches, and the comparison would measure
TorchServe's queue instead. At 100 items/s the batch outlasts the window by far. Afterwards the
batch is canceled and its queue emptied, so later scenarios start clean.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from bench.loadgen import WrkResult, run_wrk
from bench.progress import say
from bench.scenarios.context import SLOW_SECONDS, TINY_DISPATCH_BODY, Context
from bench.stack import SLOW_MODEL
from bench.table import Row, number
from shared.priorities import Priority, queue_of

P99_RATIO_TARGET = 1.5
# The bound for an interactive sync request while a batch runs.
P99_LIMIT_MS = 1000.0
INTERACTIVE_CONCURRENCY = 4
BATCH_END_WAIT = 60


def _wrk(ctx: Context) -> WrkResult:
    plan = ctx.plan
    return run_wrk(
        ctx.stack.dispatch_url(),
        TINY_DISPATCH_BODY,
        connections=plan.connections,
        seconds=plan.mixed_seconds,
    )


def _batch_body(items: int) -> dict[str, Any]:
    return {
        "requests": [
            {"custom_id": str(i), "model_name": SLOW_MODEL, "input": {"n": i}} for i in range(items)
        ]
    }


def _post_batch(http: httpx.Client, items: int) -> tuple[str, float]:
    """The batch's id and the seconds from POST to its 202."""
    began = time.monotonic()
    accepted = http.post("/batches", json=_batch_body(items))
    if accepted.status_code != 202:
        raise RuntimeError(f"POST /batches answered {accepted.status_code}: {accepted.text}")
    return str(accepted.json()["batch_id"]), time.monotonic() - began


def _ended(counts: dict[str, int]) -> int:
    return sum(counts[name] for name in ("succeeded", "failed", "canceled", "expired"))


def run(ctx: Context) -> None:
    plan, stack = ctx.plan, ctx.stack
    items = plan.mixed_batch_items
    shape = f"wrk {plan.connections} connections, {plan.mixed_seconds:g} s"
    say("mixed load: starting a worker reserved for interactive work ...")
    reserved = stack.start_interactive_worker(INTERACTIVE_CONCURRENCY)
    api = stack.api_server.url
    try:
        say(f"mixed load: sync clients on the tiny model alone, {shape} ...")
        alone = _wrk(ctx)
        say(f"  {alone.describe()}")
        say(f"mixed load: POST /batches with {number(items)} items on {SLOW_MODEL} ...")
        with httpx.Client(base_url=api, timeout=120, trust_env=False) as http:
            batch, enqueue = _post_batch(http, items)
            say(f"  accepted in {enqueue:.2f} s; sync clients again, {shape} ...")
            window = time.monotonic()
            mark = ctx.log_mark()
            mixed = _wrk(ctx)
            counts = http.get(f"/batches/{batch}").json()["request_counts"]
            window = time.monotonic() - window
            say(f"  {mixed.describe()}; batch: {counts}")
            ctx.report_log_problems(mark, "Mixed load")
            http.delete(f"/batches/{batch}")
            dropped = stack.drop_queue(queue_of(Priority.batch))
            final = http.get(f"/batches/{batch}", params={"wait": BATCH_END_WAIT}).json()
        say(f"  batch canceled ({dropped} messages dropped): {final['status']}")
    finally:
        stack.stop_workers([reserved])
    _rows(ctx, alone, mixed, counts, window, enqueue)


def _rows(
    ctx: Context,
    alone: WrkResult,
    mixed: WrkResult,
    counts: dict[str, int],
    window: float,
    enqueue: float,
) -> None:
    plan = ctx.plan
    items = plan.mixed_batch_items
    scenario = (
        f"mixed load: {plan.connections} sync clients (tiny model) while a "
        f"{number(items)}-item batch runs (slow model); {plan.workers} workers + 1 interactive"
    )
    p50_alone, p99_alone = alone.latency_ms["p50"], alone.latency_ms["p99"]
    p50_mixed, p99_mixed = mixed.latency_ms["p50"], mixed.latency_ms["p99"]
    p99_ratio = p99_mixed / p99_alone
    done = _ended(counts)
    capacity = plan.slow_workers / SLOW_SECONDS
    rate = counts["succeeded"] / window
    failed = alone.failures + mixed.failures
    if failed:
        ctx.notes.append(f"Mixed load: {failed} sync requests failed (both runs together).")
    ctx.notes.append(
        f"Mixed load: the batch's items go to the slow model, where they hold worker slots as "
        f"long as TorchServe takes (what priority classes must keep from delaying sync callers); "
        f"on the tiny model they would queue with the sync requests inside TorchServe, out of "
        f"the dispatcher's reach. The {number(items)}-item batch was accepted in {enqueue:.2f} s "
        f"(POST to 202); sync clients alone {alone.describe()}; with the batch "
        f"{mixed.describe()}."
    )
    ctx.rows += [
        Row(
            key="mixed_p99",
            scenario=scenario,
            measure="interactive p99, with the batch / without",
            direct="-",
            dispatcher=f"{p99_mixed:.1f} ms with, {p99_alone:.1f} ms without",
            ratio=f"{p99_ratio:.2f}x",
            target=f"<= {P99_RATIO_TARGET:g}x (and < {P99_LIMIT_MS / 1000:g} s)",
            met=p99_ratio <= P99_RATIO_TARGET and p99_mixed < P99_LIMIT_MS and failed == 0,
            figures={"p99_alone_ms": p99_alone, "p99_mixed_ms": p99_mixed},
        ),
        Row(
            key="mixed_p50",
            scenario=scenario,
            measure="interactive p50 and req/s, with the batch / without",
            direct="-",
            dispatcher=(
                f"{p50_mixed:.1f} ms, {number(mixed.rate())} req/s with; "
                f"{p50_alone:.1f} ms, {number(alone.rate())} req/s without"
            ),
            ratio=f"{p50_mixed / p50_alone:.2f}x",
            figures={
                "p50_alone_ms": p50_alone,
                "p50_mixed_ms": p50_mixed,
                "rps_alone": alone.rate(),
                "rps_mixed": mixed.rate(),
            },
        ),
        Row(
            key="mixed_batch",
            scenario=scenario,
            measure=f"batch items ended in the {window:.0f} s window",
            direct=f"slow model capacity {number(capacity)}/s",
            dispatcher=(
                f"{number(done)} of {number(items)} ({number(counts['succeeded'])} succeeded, "
                f"{rate:.0f}/s)"
            ),
            ratio=f"{rate / capacity:.2f} of capacity",
            target="progress (no starvation)",
            met=counts["succeeded"] > 0,
            figures={"items_succeeded": counts["succeeded"], "window_s": window},
        ),
    ]
