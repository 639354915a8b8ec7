"""(2) Throughput at 64 connections on the tiny model, and (3) against the common-pattern peer."""

from __future__ import annotations

import time

import httpx

from bench import profiling
from bench.loadgen import WrkResult, run_wrk
from bench.progress import say
from bench.scenarios.context import (
    TINY_DIRECT_BODY,
    TINY_DISPATCH_BODY,
    TORCHSERVE,
    Context,
    CpuMeter,
)
from bench.stack import TINY_MODEL
from bench.table import Row, number

# The throughput targets: a ratio to direct TorchServe and to the common pattern.
RATIO_TARGET = 0.6
PEER_RATIO_TARGET = 2.5
OWN_CPU_TARGET_MS = 1.5


def _wrk(ctx: Context, url: str, body: str) -> WrkResult:
    return run_wrk(url, body, connections=ctx.plan.connections, seconds=ctx.plan.wrk_seconds)


def _rate(result: WrkResult) -> str:
    return f"{number(result.rate())} req/s"


def run(ctx: Context) -> None:
    plan, stack = ctx.plan, ctx.stack
    shape = f"wrk {plan.connections} connections, {plan.wrk_seconds:g} s"
    say(f"throughput: direct TorchServe, {shape} ...")
    with CpuMeter(ctx.processes()) as direct_cpu:
        direct = _wrk(ctx, stack.predictions_url(TINY_MODEL), TINY_DIRECT_BODY)
    say(f"  {direct.describe()}")
    say(f"throughput: dispatcher (sync), {shape} ...")
    with CpuMeter(ctx.processes()) as cpu:
        ours = _wrk(ctx, stack.dispatch_url(), TINY_DISPATCH_BODY)
    say(f"  {ours.describe()}; CPU: {cpu.describe()}")
    ctx.notes += [
        f"CPU during the dispatcher's tiny-model throughput run (% of one core): {cpu.describe()}.",
        f"CPU per request, dispatcher: {cpu.per_request(ours.rate())}; direct TorchServe: "
        f"{direct_cpu.per_request(direct.rate())} (ms of CPU; {ctx.machine_cores} cores give "
        f"{ctx.machine_cores * 1000} ms per second).",
    ]
    ratio = ours.rate() / direct.rate()
    scenario = f"throughput, {plan.connections} connections, tiny model"
    own_ms = cpu.ms_per_request(ours.rate(), ctx.own_processes())
    torchserve_ms = direct_cpu.ms_per_request(direct.rate(), [TORCHSERVE])
    ctx.rows += [
        Row(
            key="throughput",
            scenario=scenario,
            measure="req/s (200s only)",
            direct=_rate(direct),
            dispatcher=_rate(ours),
            ratio=f"{ratio:.2f}",
            target=f">= {RATIO_TARGET:g}",
            met=ratio >= RATIO_TARGET,
            figures={"direct_rps": direct.rate(), "dispatcher_rps": ours.rate()},
        ),
        Row(
            key="own_cpu",
            scenario=scenario,
            measure="dispatcher's own CPU per sync request (API + workers + Redis)",
            direct=f"TorchServe {torchserve_ms:.2f} ms per direct request",
            dispatcher=f"{own_ms:.2f} ms",
            target=f"<= {OWN_CPU_TARGET_MS:g} ms",
            met=own_ms <= OWN_CPU_TARGET_MS,
            figures={"own_cpu_ms": own_ms, "torchserve_direct_ms": torchserve_ms},
        ),
    ]
    if plan.profile:
        _profile(ctx)
    _peer(ctx, ours)


def _profile(ctx: Context) -> None:
    """Run the throughput load again with py-spy on the API and the first worker (not timed)."""
    plan, stack = ctx.plan, ctx.stack
    seconds = plan.wrk_seconds
    say(f"profile: py-spy on the API and Celery worker 1 during {seconds:g} s of throughput ...")
    targets = {"API": stack.api_server.pid, "Celery worker 1": ctx.workers[0].pid}
    outputs = {name: ctx.run_dir / "profiles" / f"{name.replace(' ', '-')}.txt" for name in targets}
    recordings = {
        name: profiling.start_recording(pid, seconds, outputs[name])
        for name, pid in targets.items()
    }
    loaded = _wrk(ctx, stack.dispatch_url(), TINY_DISPATCH_BODY)
    for name, recording in recordings.items():
        profiling.finish_recording(recording, seconds)
        summary = profiling.summarize(name, profiling.Profile.load(outputs[name], seconds))
        ctx.profile += [*summary, ""]
    ctx.profile += [
        f"(Profiled run: {loaded.describe()}. Raw stacks: {ctx.run_dir / 'profiles'}.)",
        "",
    ]


def warm_up(url: str, seconds: float = 60.0) -> None:
    """POST the tiny request until it is answered 200, or fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            response = httpx.post(
                url,
                content=TINY_DISPATCH_BODY,
                headers={"Content-Type": "application/json"},
                timeout=seconds,
            )
            if response.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer a request within {seconds:g} s")
        time.sleep(0.2)


def _peer(ctx: Context, ours: WrkResult) -> None:
    plan, stack = ctx.plan, ctx.stack
    say(
        f"peer: starting FastAPI + Celery AsyncResult.get() ({plan.workers} workers, "
        f"{plan.pool} x {plan.concurrency}) on its own Redis ..."
    )
    with stack.start_peer(plan.workers, plan.concurrency, plan.pool) as peer:
        # One answered request first: a cold peer (first connections, Celery's first task) is
        # not what the load measures, and on a loaded machine the smoke run's 1 s window could
        # otherwise end before its first answer (0 req/s).
        warm_up(peer.dispatch_url)
        say("throughput: peer (common pattern), same load ...")
        theirs = _wrk(ctx, peer.dispatch_url, TINY_DISPATCH_BODY)
        say(f"  {theirs.describe()}")
        leftover = peer.channels()
    ctx.notes.append(
        f"The peer left {leftover} pub/sub channels subscribed on its Redis after its run "
        "(Celery's result backend subscribes per task)."
    )
    ratio = ours.rate() / max(theirs.rate(), 1e-9)
    failed = f", {theirs.failures} failed" if theirs.failures else ""
    ctx.rows.append(
        Row(
            key="peer",
            scenario="throughput vs common pattern (FastAPI + AsyncResult.get() in threadpool)",
            measure="req/s, same load",
            direct=f"peer {_rate(theirs)}{failed}",
            dispatcher=_rate(ours),
            ratio=f"{ratio:.2f}",
            target=f">= {PEER_RATIO_TARGET:g}",
            met=ratio >= PEER_RATIO_TARGET,
            figures={"peer_rps": theirs.rate(), "dispatcher_rps": ours.rate()},
        )
    )
