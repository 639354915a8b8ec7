"""(12) An OIP backend: a real MLServer, direct and through the dispatcher, in the same run.

MLServer 1.7.1 serves the scikit-learn `iris` model of the backend tests (tests/support/servers/
mlserver.py, its venv built from the committed hashed lock on first use and cached in
.local/venvs); the dispatcher gets it as `BACKENDS={"mls": {"url": ..., "protocol": "oip"}}`
through an API and workers of its own, and requests name it with `"backend": "mls"`. Measured
like throughput.py: wrk against MLServer's /v2/models/iris/infer, then against /dispatch_model
with the same inference request as `input`, plus one client's sequential p50 each way.

MLServer runs as one process (`parallel_workers: 0`): one core at most. When the direct run
keeps that core busy, MLServer is what limits the direct side, and the row says so.

The server support (venv builder, hashed lock, model, start and stop) lives with the backend
tests; this is the one bench module that imports tests/, so that it keeps one copy. Both are
repository tools run from the root (neither is in an image).
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import httpx

from bench.loadgen import WrkResult, run_wrk
from bench.progress import say
from bench.scenarios.context import Context, CpuMeter
from bench.scenarios.latency import P50_OVERHEAD_TARGET_MS
from bench.scenarios.throughput import RATIO_TARGET
from bench.sequential import Latencies, measure
from bench.table import Row, number
from devstack import ApiServer, CeleryWorker
from tests.support.servers import mlserver
from tests.support.servers.running import RunningServer

BACKEND = "mls"
MLSERVER = "MLServer"
# MLServer's share of one core during the direct run above which it is what limits that run.
BOUND_SHARE = 85.0
SCENARIO = "OIP backend (MLServer 1.7.1, sklearn iris)"


def _bodies() -> tuple[dict[str, Any], dict[str, Any]]:
    """The direct inference request, and the dispatch request that carries it as `input`."""
    direct = mlserver.infer_body()
    return direct, {"backend": BACKEND, "model_name": mlserver.MODEL_NAME, "input": direct}


def _check_same_answer(server: RunningServer, api: ApiServer, dispatch: dict[str, Any]) -> None:
    """The dispatched answer is MLServer's own (less its per-request id): no load measures a
    path that answers something else."""
    expected = mlserver.without_id(mlserver.infer(server))
    with httpx.Client(timeout=60, trust_env=False) as http:
        response = http.post(f"{api.url}/dispatch_model", json=dispatch)
    if response.status_code != 200:
        raise RuntimeError(f"oip: dispatch answered {response.status_code}: {response.text}")
    value = response.json()["prediction_value"]
    if not isinstance(value, dict) or mlserver.without_id(value) != expected:
        raise RuntimeError(f"oip: dispatched answer {value!r} is not MLServer's {expected!r}")


def _groups(
    server: RunningServer, api: ApiServer, workers: list[CeleryWorker], ctx: Context
) -> dict[str, int]:
    groups = {MLSERVER: server.pid, "API": api.pid, "redis-server": ctx.stack.redis.pid}
    for index, worker in enumerate(workers, 1):
        groups[f"Celery worker {index}"] = worker.pid
    return groups


def run(ctx: Context) -> None:
    plan, stack = ctx.plan, ctx.stack
    ctx.stop_workers()  # only workers that know the backend may take these tasks
    say("oip: MLServer (venv from tests/support/servers/locks, built if missing) ...")
    venv = mlserver.prepare()
    root = ctx.run_dir / "mlserver"
    shutil.rmtree(root, ignore_errors=True)  # the run directory is the benchmark's own
    root.mkdir(parents=True)
    with mlserver.running(venv, root) as server:
        backends = {BACKEND: {"url": server.url, "protocol": "oip"}}
        env = {"BACKENDS": json.dumps(backends)}
        api = stack.start_api(1, env=env, name="oip")
        workers = stack.start_workers(plan.workers, plan.concurrency, plan.pool, env=env)
        try:
            _measure(ctx, server, api, workers)
        finally:
            stack.stop_workers(workers)
            api.stop()
    stack.drop_queue()  # what wrk left in flight; the scenarios after this start without workers


def _measure(
    ctx: Context, server: RunningServer, api: ApiServer, workers: list[CeleryWorker]
) -> None:
    plan = ctx.plan
    direct_body, dispatch_body = _bodies()
    direct_url = f"{server.url}/v2/models/{mlserver.MODEL_NAME}/infer"
    dispatch_url = f"{api.url}/dispatch_model"
    _check_same_answer(server, api, dispatch_body)
    count, warmup = plan.latency_requests, plan.latency_warmup
    say(f"oip: {count} sequential requests each way ...")
    direct_seq = measure(direct_url, direct_body, requests=count, warmup=warmup)
    ours_seq = measure(dispatch_url, dispatch_body, requests=count, warmup=warmup)
    connections, seconds = plan.oip_connections, plan.wrk_seconds
    shape = f"wrk {connections} connections, {seconds:g} s"
    groups = _groups(server, api, workers, ctx)
    say(f"oip: direct MLServer, {shape} ...")
    with CpuMeter(groups) as direct_cpu:
        direct = run_wrk(
            direct_url, json.dumps(direct_body), connections=connections, seconds=seconds
        )
    say(f"  {direct.describe()}; CPU: {direct_cpu.describe()}")
    say(f"oip: dispatcher (sync, backend {BACKEND!r}), {shape} ...")
    # Not timed: the sequential requests opened one connection per worker to MLServer; the
    # load would otherwise also measure the workers opening the rest.
    run_wrk(dispatch_url, json.dumps(dispatch_body), connections=connections, seconds=0.5)
    with CpuMeter(groups) as cpu:
        ours = run_wrk(
            dispatch_url, json.dumps(dispatch_body), connections=connections, seconds=seconds
        )
    say(f"  {ours.describe()}; CPU: {cpu.describe()}")
    bound = direct_cpu.shares[MLSERVER] >= BOUND_SHARE
    ctx.notes.append(_note(ctx, connections, direct, ours, direct_cpu, cpu, bound))
    ctx.rows += [_throughput_row(direct, ours, connections, bound), _p50_row(direct_seq, ours_seq)]


def _note(
    ctx: Context,
    connections: int,
    direct: WrkResult,
    ours: WrkResult,
    direct_cpu: CpuMeter,
    cpu: CpuMeter,
    bound: bool,
) -> str:
    """Who limits each side: MLServer's one core direct; through the dispatcher, every
    service's CPU per request against the machine's cores (the ceiling of the ratio)."""
    own = [name for name in cpu.shares if name not in (MLSERVER, "load generator (wrk)")]
    busy, cores = sum(cpu.shares.values()), ctx.machine_cores
    total_ms = busy * 10 / ours.rate() if ours.rate() else 0.0
    ceiling = cores * 1000 / total_ms if total_ms else 0.0
    limit = ", so MLServer is what limits the direct side" if bound else ""
    verdict = (
        "the cores were busy, so the CPU the dispatcher adds per request, not MLServer, is "
        "what bounds the dispatched side"
        if busy >= BOUND_SHARE * cores
        else "the cores were not saturated, so the dispatched side waited rather than computed"
    )
    return (
        f"OIP backend ({connections} connections): MLServer used "
        f"{direct_cpu.shares[MLSERVER]:.0f}% of one core (it runs as one process) serving "
        f"{number(direct.rate())} req/s direct{limit}, "
        f"{direct_cpu.ms_per_request(direct.rate(), [MLSERVER]):.2f} ms of CPU per request. "
        f"Through the dispatcher: {cpu.per_request(ours.rate())}; the dispatcher's own (API + "
        f"workers + Redis) {cpu.ms_per_request(ours.rate(), own):.2f} ms. At that total "
        f"{cores} cores serve at most {number(ceiling)} req/s, "
        f"{ceiling / max(direct.rate(), 1e-9):.2f} of the direct rate; they were {busy:.0f}% "
        f"busy of {cores * 100}%: {verdict}."
    )


def _throughput_row(direct: WrkResult, ours: WrkResult, connections: int, bound: bool) -> Row:
    ratio = ours.rate() / direct.rate() if direct.rate() else 0.0
    limit = " (MLServer-bound: one core)" if bound else ""
    return Row(
        key="oip_throughput",
        scenario=f"{SCENARIO}, {connections} connections",
        measure="req/s (200s only), dispatched / direct",
        direct=f"MLServer {number(direct.rate())} req/s{limit}",
        dispatcher=f"{number(ours.rate())} req/s",
        ratio=f"{ratio:.2f}",
        target=f">= {RATIO_TARGET:g}",
        met=ratio >= RATIO_TARGET,
        figures={"direct_rps": direct.rate(), "dispatcher_rps": ours.rate()},
    )


def _p50_row(direct: Latencies, ours: Latencies) -> Row:
    overhead = ours.p50 - direct.p50
    return Row(
        key="oip_latency_p50",
        scenario=f"{SCENARIO}, 1 client",
        measure="p50",
        direct=f"MLServer {direct.p50:.2f} ms",
        dispatcher=f"{ours.p50:.2f} ms",
        ratio=f"{overhead:+.2f} ms",
        target=f"overhead <= {P50_OVERHEAD_TARGET_MS:g} ms",
        met=overhead <= P50_OVERHEAD_TARGET_MS,
        figures={"direct_ms": direct.p50, "dispatcher_ms": ours.p50},
    )
