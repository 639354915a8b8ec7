"""(10) A CPU-bound model: what the dispatcher's own CPU costs a model that needs the cores.

A model burning ~10 ms of CPU per request (bench/models/cpu10.py, 2 TorchServe workers) under a
few clients, direct and through the dispatcher: on two shared cores every millisecond the API,
the workers and Redis spend is a millisecond the model does not get, so the throughput ratio is
what a CPU-served model loses to the queue.
"""

from __future__ import annotations

import json

from bench.loadgen import run_wrk
from bench.progress import say
from bench.scenarios.context import TORCHSERVE, Context, CpuMeter, dispatch_body
from bench.stack import CPU_MODEL
from bench.table import Row, number

RATIO_TARGET = 0.93
TORCHSERVE_WORKERS = 2
INPUT = {"hello": "cpu"}


def run(ctx: Context) -> None:
    plan, stack = ctx.plan, ctx.stack
    connections, seconds = plan.cpu_model_connections, plan.wrk_seconds
    if not ctx.workers:  # the scale scenario before this one stops its own
        say(f"cpu model: starting {plan.workers} Celery workers ...")
        ctx.workers = stack.start_workers(plan.workers, plan.concurrency, plan.pool)
    say(f"cpu model: registering {CPU_MODEL} ({TORCHSERVE_WORKERS} TorchServe workers) ...")
    stack.torchserve.register(f"{CPU_MODEL}.mar", initial_workers=TORCHSERVE_WORKERS)
    shape = f"wrk {connections} connections, {seconds:g} s"
    direct_url = stack.predictions_url(CPU_MODEL)
    # One request each way first: the first call of a worker is not what the load measures.
    run_wrk(direct_url, '{"warm": 1}', connections=TORCHSERVE_WORKERS, seconds=0.5)
    say(f"cpu model: direct TorchServe, {shape} ...")
    with CpuMeter(ctx.processes()) as direct_cpu:
        direct = run_wrk(direct_url, json.dumps(INPUT), connections=connections, seconds=seconds)
    say(f"  {direct.describe()}")
    say(f"cpu model: dispatcher (sync), {shape} ...")
    body = dispatch_body(CPU_MODEL, INPUT)
    with CpuMeter(ctx.processes()) as cpu:
        ours = run_wrk(stack.dispatch_url(), body, connections=connections, seconds=seconds)
    say(f"  {ours.describe()}; CPU: {cpu.describe()}")
    stack.torchserve.scale(CPU_MODEL, 0)
    model_ms = direct_cpu.ms_per_request(direct.rate(), [TORCHSERVE])
    ctx.notes.append(
        f"CPU model ({CPU_MODEL}, {TORCHSERVE_WORKERS} TorchServe workers, {connections} "
        f"clients): TorchServe {model_ms:.2f} ms of CPU per direct request; CPU per request "
        f"through the dispatcher: {cpu.per_request(ours.rate())}; direct p50 "
        f"{direct.latency_ms['p50']:.1f} ms, dispatched p50 {ours.latency_ms['p50']:.1f} ms."
    )
    ratio = ours.rate() / direct.rate() if direct.rate() else 0.0
    ctx.rows.append(
        Row(
            key="cpu_model",
            scenario=(
                f"CPU-bound model (~10 ms of CPU a request, {TORCHSERVE_WORKERS} TorchServe "
                f"workers), {connections} clients"
            ),
            measure="req/s, dispatched / direct",
            direct=f"{number(direct.rate())} req/s",
            dispatcher=f"{number(ours.rate())} req/s",
            ratio=f"{ratio:.2f}",
            target=f">= {RATIO_TARGET:g}",
            met=ratio >= RATIO_TARGET,
            figures={"direct_rps": direct.rate(), "dispatcher_rps": ours.rate()},
        )
    )
