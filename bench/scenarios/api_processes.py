"""(9) Several API processes (API_WORKERS, `uvicorn --workers`) on the same Redis and workers.

A second API with `api_processes` processes (one Prometheus multiprocess directory, as make run
sets up) next to the run's one-process API: the async submit rate through it, measured exactly
like the one-process figure of (7) (wrk, no Celery worker running), then waiting clients on the
slow model through it, each with its own input, each checking that the answer is its own: a sync
wait may be woken in a process other than the one the worker's task came from, and every waiter
must get its own task's result. Each process's own metrics file tells how many submissions it
took, so the row also shows that every process served.
"""

from __future__ import annotations

from prometheus_client.multiprocess import MultiProcessCollector

from bench.loadgen import WrkResult, run_wrk
from bench.progress import say
from bench.scenarios.burst import wait_bound
from bench.scenarios.context import (
    SLOW_SECONDS,
    TINY_DISPATCH_BODY,
    Context,
    CpuMeter,
    dispatch_body,
)
from bench.shots import NUMBER, Volley, VolleyResult, fire
from bench.stack import SLOW_MODEL
from bench.table import Row, number
from devstack import ApiServer

ACCEPTED = 202
SUBMITTED = "dispatcher_tasks_submitted_total"
# The slow model echoes its input: request i sends {"n": i} and must get {"n": i} back.
NUMBERED_BODY = dispatch_body(SLOW_MODEL, {"n": "@"}).replace('"@"', NUMBER.decode()).encode()
NUMBERED_ANSWER = b'{"n": ' + NUMBER + b"}"


def submitted_per_process(api: ApiServer) -> dict[int, float]:
    """Tasks each serving process counted as submitted, read from its own multiprocess file."""
    if api.metrics_dir is None:
        return {}
    counts = {}
    for pid in api.server_pids():
        path = api.metrics_dir / f"counter_{pid}.db"
        merged = MultiProcessCollector.merge([str(path)]) if path.exists() else []  # type: ignore[no-untyped-call]
        samples = [sample for metric in merged for sample in metric.samples]
        counts[pid] = sum(sample.value for sample in samples if sample.name == SUBMITTED)
    return counts


def _one_process_rate(ctx: Context) -> float:
    """The submit rate of (7), the one-process figure this scenario compares with."""
    for row in ctx.rows:
        if row.key == "submit":
            return row.figures["accepted_rps"]
    raise RuntimeError("the submit-rate scenario must run before the several-processes one")


def _submit_rate(ctx: Context, api: ApiServer) -> WrkResult:
    plan, stack = ctx.plan, ctx.stack
    processes = plan.api_processes
    say(
        f"API processes: async submits through {processes} processes, wrk {plan.connections} "
        f"connections, {plan.submit_seconds:g} s, no workers running ..."
    )
    groups = {f"API ({processes} processes)": api.pid, "redis-server": stack.redis.pid}
    with CpuMeter(groups) as cpu:
        submits = run_wrk(
            f"{api.url}/dispatch_model",
            TINY_DISPATCH_BODY,
            connections=plan.connections,
            seconds=plan.submit_seconds,
            headers=("Prefer: respond-async",),
        )
    say(f"  {submits.describe(ACCEPTED)}; CPU: {cpu.describe()}")
    stack.drop_queue()
    ctx.notes.append(
        f"CPU during the {processes}-process submit run (% of one core): {cpu.describe()}; "
        f"per accepted request: {cpu.per_request(submits.rate(ACCEPTED))}."
    )
    return submits


def _waiters(ctx: Context, api: ApiServer) -> VolleyResult:
    plan, stack = ctx.plan, ctx.stack
    count = plan.api_processes_waiting
    capacity = plan.slow_workers / SLOW_SECONDS
    wait = wait_bound(count, capacity)
    say(
        f"API processes: {count} waiting clients on the slow model through "
        f"{plan.api_processes} processes, each its own input (ideal {count / capacity:.0f} s) ..."
    )
    ctx.workers = stack.start_workers(plan.workers, plan.concurrency, plan.pool)
    mark = ctx.log_mark()
    waiters = fire(
        Volley(
            f"{api.url}/dispatch_model",
            NUMBERED_BODY,
            count,
            headers=(("Prefer", f"wait={wait:g}"),),
            ramp=plan.waiting_ramp_seconds,
            timeout=wait + 15,
            answer=NUMBERED_ANSWER,
        ),
        plan.client_processes,
    )
    ctx.report_log_problems(mark, "Several API processes")
    say(
        f"  {waiters.count(200)}/{count} answered 200, {waiters.own_answers} with their own "
        f"input, in {waiters.span:.1f} s (statuses {dict(waiters.statuses)})"
    )
    if waiters.errors:
        ctx.notes.append(f"Several API processes: client-side errors {dict(waiters.errors)}.")
    return waiters


def run(ctx: Context) -> None:
    plan, stack = ctx.plan, ctx.stack
    processes = plan.api_processes
    one = _one_process_rate(ctx)
    # No Celery worker runs (the submit scenario stopped them): the API's figure alone.
    ctx.stop_workers()
    say(f"API processes: starting a second API with {processes} processes (uvicorn --workers) ...")
    api = stack.start_api(processes)
    try:
        submits = _submit_rate(ctx, api)
        waiters = _waiters(ctx, api)
        per_process = submitted_per_process(api)
    finally:
        ctx.stop_workers()
        api.stop()
    ctx.notes.append(
        "Several API processes: tasks submitted per process (submit run and waiters): "
        + ", ".join(number(count) for count in per_process.values())
        + "."
    )
    served_by = sum(1 for count in per_process.values() if count > 0)
    rate, count, own = submits.rate(ACCEPTED), plan.api_processes_waiting, waiters.own_answers
    scenario = f"several API processes ({processes}, uvicorn --workers), same Redis and workers"
    ctx.rows += [
        Row(
            key="api_processes_submit",
            scenario=scenario,
            measure=f"async POST (202) req/s, {processes} processes / 1",
            direct="-",
            dispatcher=f"{number(rate)} req/s ({number(one)} with 1 process)",
            ratio=f"{rate / one:.2f}",
            figures={"accepted_rps": rate, "one_process_rps": one},
        ),
        Row(
            key="api_processes_waiters",
            scenario=scenario,
            measure=f"{number(count)} waiting clients (slow model): own answer",
            direct="-",
            dispatcher=(
                f"{number(own)} of {number(count)} in {waiters.span:.0f} s; "
                f"{served_by} of {processes} processes served"
            ),
            target="all, each its own input's; every process serves",
            met=own == count and served_by == processes,
            figures={"own_answers": own, "seconds": waiters.span, "processes_served": served_by},
        ),
    ]
