"""One benchmark run: start the stack, play the scenarios in order, build the report."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench import profiling
from bench.loadgen import ensure_wrk
from bench.machine import machine, raise_open_files_limit
from bench.plan import Plan
from bench.progress import say
from bench.report import Report
from bench.scenarios import (
    api_processes,
    burst,
    cpu_model,
    figures,
    latency,
    long_calls,
    mixed,
    oip,
    replication,
    scale,
    streams,
    submit,
    throughput,
    waiting,
)
from bench.scenarios.context import Context
from bench.stack import JOB_QUEUE_SIZE, BenchStack

SCENARIOS: list[tuple[str, Callable[[Context], None]]] = [
    ("latency", latency.run),
    ("throughput", throughput.run),
    ("burst", burst.run),
    ("waiting", waiting.run),
    ("mixed", mixed.run),
    ("scale", scale.run),
    ("cpu_model", cpu_model.run),
    # Stops the shared workers: the scenarios after it start their own or none.
    ("oip", oip.run),
    ("long_calls", long_calls.run),
    ("streams", streams.run),
    ("submit", submit.run),
    # The same submits on a Sentinel topology (its own API and Redis): what WAIT costs.
    ("replication", replication.run),
    ("figures", figures.run),
    # After the one-process submit rate it compares with; stops its API before the check below.
    ("api_processes", api_processes.run),
    ("pubsub", submit.check_subscriptions),
]
NAMES = [name for name, _ in SCENARIOS]
# Left out of the smoke run (unless named with --only) until tests/e2e/test_bench_smoke.py
# lists their rows and phases: that test checks the set of rows exactly.
NOT_IN_SMOKE = {"streams", "replication"}


def selected(plan: Plan, only: Sequence[str] = ()) -> list[Callable[[Context], None]]:
    """The scenarios to play, in plan order: those named in `only`, else every one (less
    NOT_IN_SMOKE in a smoke run). A scenario that needs an earlier one's rows says so."""
    unknown = sorted(set(only) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}: choose from {NAMES}")
    if only:
        return [scenario for name, scenario in SCENARIOS if name in only]
    skipped = NOT_IN_SMOKE if plan.smoke else set()
    return [scenario for name, scenario in SCENARIOS if name not in skipped]


def describe_stack(plan: Plan) -> str:
    return (
        f"TorchServe 0.12 (echo: 1 worker; slow20: {plan.slow_workers} workers, "
        f"{plan.scale_torchserve_workers} for the scale scenario; cpu10: 2 workers; "
        f"job_queue_size {JOB_QUEUE_SIZE}); a stand-in model server for the long calls "
        f"(devstack/upstream.py); a second TorchServe for the streaming model (batchstream: "
        f"{plan.streams_torchserve_workers} workers, batches of {plan.streams_batch_size}); "
        f"MLServer 1.7.1 (sklearn iris, 1 process) as the OIP "
        f"backend; dispatcher: 1 API process (uvicorn), {plan.workers} Celery "
        f"workers "
        f"({plan.pool} x {plan.concurrency}), plus one worker reserved for interactive work in "
        f"the mixed-load scenario and a second API of {plan.api_processes} processes in the "
        "several-processes one; redis-server without persistence; the peer: "
        f"its own API process, {plan.workers} Celery workers ({plan.pool} x {plan.concurrency}) "
        "and its own redis-server"
    )


def prepare(workdir: Path, plan: Plan) -> None:
    """Fail fast on missing tools, before a minute of stack start-up."""
    ensure_wrk()
    if plan.profile:
        profiling.py_spy()
    raise_open_files_limit()
    # The work directory belongs to the benchmark: a previous run's logs are replaced.
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)


def run(plan: Plan, workdir: Path, command: str, only: Sequence[str] = ()) -> Report:
    """Run the scenarios (all, or those in `only`) against a fresh stack under `workdir`; the
    stack is always stopped."""
    scenarios = selected(plan, only)
    prepare(workdir, plan)
    began = time.monotonic()
    report = Report(
        command=command,
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine(),
        stack=describe_stack(plan),
        load_before=os.getloadavg(),
    )
    with BenchStack(workdir) as stack:
        stack.start(plan.slow_workers)
        ctx = Context(plan, stack, workdir)
        say(f"starting {plan.workers} Celery workers ({plan.pool} x {plan.concurrency}) ...")
        ctx.workers = stack.start_workers(plan.workers, plan.concurrency, plan.pool)
        for scenario in scenarios:
            scenario(ctx)
        say("stopping the stack ...")
    report.rows, report.notes, report.profile = ctx.rows, ctx.notes, ctx.profile
    report.load_after = os.getloadavg()
    report.seconds = time.monotonic() - began
    report.notes.append(f"Logs of this run: {workdir}.")
    return report
