"""(13) Streamed outputs at scale: 1,000 SSE clients on one API process, each on its own task.

Every client POSTs a streamed dispatch (`"stream": true`, a wait, `Accept: text/event-stream`,
so the answer is the task's Server-Sent Events) and reads its `output` events, then `done`. The
model (bench/models/batchstream.py, on a TorchServe of its own that batches so that a few
workers stream to all requests at once) stamps each piece with its send time; a piece's added
latency is its arrival at the client minus that time. The same clients first read the same
streams from TorchServe directly (its chunked body), so the direct figures of the same run say
what TorchServe and the load generator cost by themselves.

Judged: every stream complete (each piece of its own task, in order, then `done` succeeded);
the API's threads flat and its RSS bounded while the streams are open (one StreamHub per
process: no thread, no connection per client); the API's Redis connections within its pool's
cap plus the hub's and the finished channel's, whatever the number of clients (CLIENT LIST,
attributed by socket; the workers' and the total are reported beside). Reported: per-piece
added latency p50/p99 and time to first event, each against direct TorchServe.
"""

from __future__ import annotations

import json

from api.main import REDIS_POOL_SIZE
from bench import profiling
from bench.machine import rss_mb, threads
from bench.progress import say
from bench.redis_clients import ConnectionSampler, count_by_service
from bench.sampler import Sampler, footprint_rows
from bench.scenarios.context import Context, CpuMeter
from bench.sequential import Latencies
from bench.shots import NUMBER
from bench.stack import STREAM_MODEL
from bench.stream_clients import StreamShot, StreamVolley, stream_all
from bench.table import Row, number
from devstack import ApiServer, CeleryWorker, TorchServe

RSS_GROWTH_TARGET_MB = 200.0
# The API's pool (api/main.py), the hub's blocking XREAD, the finished channel's subscriber.
API_CONNECTIONS_CAP = REDIS_POOL_SIZE + 2
WARMUP_CLIENTS = 20
LOAD_GENERATOR = "load generator (wrk)"  # CpuMeter's name for reaped children: here the clients


def _model_input(chunks: int, delay: float) -> bytes:
    """The model's request body with the client's number in `n` (NUMBER, replaced per client)."""
    text = json.dumps({"n": "N", "chunks": chunks, "delay": delay})
    return text.replace('"N"', NUMBER.decode()).encode()


def _dispatch_body(chunks: int, delay: float) -> bytes:
    model_input = _model_input(chunks, delay).decode()
    return f'{{"model_name": "{STREAM_MODEL}", "stream": true, "input": {model_input}}}'.encode()


def _p50(values: list[float]) -> float:
    """The median in ms (0 with no values)."""
    return Latencies([value * 1000 for value in values] or [0.0], 0).p50


def _stages(streams: Streams) -> str:
    """Where the time to first event goes, p50 of each stage (the dispatched side only)."""
    return ", ".join(f"{name} {ms:.0f} ms" for name, ms in streams.stages.items())


class Streams:
    """One volley's figures: completions, per-piece added latency, time to first event."""

    def __init__(self, shots: list[StreamShot]) -> None:
        self.shots = shots
        self.complete = sum(1 for shot in shots if shot.complete)
        pieces = [latency * 1000 for shot in shots for latency in shot.latencies]
        self.pieces = Latencies(pieces or [0.0], 0)
        firsts = [(shot.first - shot.sent) * 1000 for shot in shots if shot.first]
        self.first = Latencies(firsts or [0.0], 0)
        self.span = max(s.ended for s in shots) - min(s.sent for s in shots)
        errors: dict[str, int] = {}
        for shot in shots:
            if shot.error:
                errors[shot.error] = errors.get(shot.error, 0) + 1
        self.errors = dict(sorted(errors.items(), key=lambda item: -item[1])[:3])
        self.restarts = sum(shot.restarts for shot in shots)
        timed = [shot for shot in shots if shot.first and shot.started]
        self.stages = {
            "to the API": _p50([shot.created - shot.sent for shot in timed]),
            "pickup": _p50([shot.started - shot.created for shot in timed]),
            "to the model's first piece": _p50([shot.first_sent - shot.started for shot in timed]),
            "its delivery": _p50([shot.first - shot.first_sent for shot in timed]),
        }

    def describe(self) -> str:
        errors = f"; errors {self.errors}" if self.errors else ""
        if self.restarts:
            errors += f"; {self.restarts} restart events"
        return (
            f"{self.complete}/{len(self.shots)} complete in {self.span:.1f} s; per piece p50 "
            f"{self.pieces.p50:.1f} ms, p99 {self.pieces.p99:.1f} ms; first event p50 "
            f"{self.first.p50:.0f} ms, p99 {self.first.p99:.0f} ms{errors}"
        )


def _volley(
    ctx: Context, url: str, body: bytes, count: int, events: bool, ramp: float = 0.0
) -> StreamVolley:
    plan = ctx.plan
    headers = (("Prefer", f"wait={plan.streams_budget:g}"), ("Accept", "text/event-stream"))
    return StreamVolley(
        url,
        body,
        count,
        "events" if events else "pieces",
        headers=headers if events else (),
        ramp=ramp,
        timeout=plan.streams_budget,
    )


def run(ctx: Context) -> None:
    plan, stack = ctx.plan, ctx.stack
    ctx.stop_workers()  # only workers that reach the streaming TorchServe may take these tasks
    count = plan.streams_clients
    say(
        f"streams: TorchServe for {STREAM_MODEL} ({plan.streams_torchserve_workers} workers, "
        f"batches of {plan.streams_batch_size}) ..."
    )
    server = stack.start_stream_torchserve(
        plan.streams_torchserve_workers,
        plan.streams_batch_size,
        plan.streams_batch_delay_ms,
        queue=2 * count,
    )
    env = {"TORCHSERVE_URL": server.inference_url}
    api = stack.start_api(1, env=env, name="streams")
    # Room for every stream at once in each worker: calls, not slots, are what is measured.
    slots = {"WORKER_MAX_IN_FLIGHT": str(count), "WORKER_MAX_CALLS_PER_BACKEND": str(count)}
    workers = stack.start_workers(
        plan.streams_worker_processes, plan.concurrency, plan.pool, env={**env, **slots}
    )
    try:
        _measure(ctx, server, api, workers)
    finally:
        stack.stop_workers(workers)
        api.stop()
        server.stop()
    stack.drop_queue()  # nothing should be left; the scenarios after this start without workers


def _measure(ctx: Context, server: TorchServe, api: ApiServer, workers: list[CeleryWorker]) -> None:
    plan, stack = ctx.plan, ctx.stack
    count, chunks, delay = plan.streams_clients, plan.streams_chunks, plan.streams_delay
    direct_url = f"{server.inference_url}/predictions/{STREAM_MODEL}"
    dispatch_url = f"{api.url}/dispatch_model"
    body, dispatch = _model_input(chunks, delay), _dispatch_body(chunks, delay)
    groups = {"API": api.pid, "TorchServe": server.pid, "redis-server": stack.redis.pid}
    groups |= {f"Celery worker {i}": worker.pid for i, worker in enumerate(workers, 1)}
    shape = f"{number(count)} clients, {chunks} pieces {delay:g} s apart"

    def volley(url: str, data: bytes, *, events: bool) -> StreamVolley:
        return _volley(ctx, url, data, count, events, plan.streams_ramp)

    # Warm both paths (TorchServe's workers, the API's threadpool, Redis pool and hub) with
    # short streams, so growth below means open streams.
    warm_body, warm_dispatch = _model_input(2, 0.0), _dispatch_body(2, 0.0)
    stream_all(_volley(ctx, direct_url, warm_body, WARMUP_CLIENTS, events=False), 1)
    warm = Streams(stream_all(_volley(ctx, dispatch_url, warm_dispatch, WARMUP_CLIENTS, True), 1))
    if warm.complete != WARMUP_CLIENTS:
        raise RuntimeError(f"streams: the warm-up streams failed: {warm.describe()}")
    say(f"streams: direct TorchServe, {shape} ...")
    with CpuMeter(groups) as direct_cpu:
        direct = Streams(stream_all(volley(direct_url, body, events=False), plan.client_processes))
    say(f"  {direct.describe()}")
    with stack.client() as redis_client:
        redis_groups = {"API": api.pid, **{f"worker {i}": w.pid for i, w in enumerate(workers, 1)}}
        before = count_by_service(redis_client, stack.redis.port, redis_groups)
        threads_before, rss_before = threads(api.pid), rss_mb(api.pid)
        say(f"streams: through the dispatcher (SSE answers of one API process), {shape} ...")
        mark = ctx.log_mark()
        profile = _Profile(ctx, api) if plan.profile else None
        with (
            Sampler(api.pid) as sampler,
            ConnectionSampler(redis_client, stack.redis.port, redis_groups) as connections,
            CpuMeter(groups) as cpu,
        ):
            ours = Streams(
                stream_all(volley(dispatch_url, dispatch, events=True), plan.client_processes)
            )
        if profile is not None:
            profile.finish()
    ctx.report_log_problems(mark, "Streams")
    peak = connections.peak
    say(
        f"  {ours.describe()}; API threads {threads_before} -> max "
        f"{max(sampler.thread_counts)}, RSS {rss_before:.0f} -> max {max(sampler.rss):.0f} MB; "
        f"Redis connections (before -> max): {_connections(before, peak)}"
    )
    say(f"  first event by stage (p50): {_stages(ours)}")
    say(f"  CPU (% of one core): direct {_shares(direct_cpu)}; dispatched {_shares(cpu)}")
    ctx.notes.append(_note(count, direct, ours, direct_cpu, cpu, before, peak))
    scenario = f"streams, {shape}, 1 API process"
    ctx.rows += [
        _complete_row(scenario, count, direct, ours),
        *footprint_rows(
            "streams", scenario, "API", sampler, threads_before, rss_before, RSS_GROWTH_TARGET_MB
        ),
        _connections_row(scenario, before, peak),
        *_latency_rows(scenario, direct, ours),
    ]


class _Profile:
    """py-spy on the API while the streams run (`--profile`), summarized into the report."""

    def __init__(self, ctx: Context, api: ApiServer) -> None:
        plan = ctx.plan
        # The ramp, every piece, and a little for the first ones to start.
        self.seconds = plan.streams_ramp + plan.streams_chunks * plan.streams_delay + 2
        self.ctx, self.output = ctx, ctx.run_dir / "profiles" / "api-streams.txt"
        self.recording = profiling.start_recording(api.pid, self.seconds, self.output)

    def finish(self) -> None:
        profiling.finish_recording(self.recording, self.seconds)
        loaded = profiling.Profile.load(self.output, self.seconds)
        self.ctx.profile += [*profiling.summarize("API, streams", loaded), ""]


def _connections(before: dict[str, int], peak: dict[str, int]) -> str:
    return ", ".join(f"{name} {before[name]} -> {peak[name]}" for name in peak)


def _shares(meter: CpuMeter) -> str:
    shares = {
        ("clients" if name == LOAD_GENERATOR else name): share
        for name, share in meter.shares.items()
    }
    busiest = sorted(shares.items(), key=lambda item: -item[1])
    return ", ".join(f"{name} {share:.0f}%" for name, share in busiest if share >= 0.5)


def _note(
    count: int,
    direct: Streams,
    ours: Streams,
    direct_cpu: CpuMeter,
    cpu: CpuMeter,
    before: dict[str, int],
    peak: dict[str, int],
) -> str:
    return (
        f"Streams ({number(count)} clients): CPU (% of one core) reading TorchServe directly: "
        f"{_shares(direct_cpu)}; through the dispatcher: {_shares(cpu)}. Redis connections "
        f"(CLIENT LIST by owning process, before -> most during): {_connections(before, peak)}."
        f" Direct: {direct.describe()}. Dispatched: {ours.describe()}; its time to first "
        f"event by stage (p50 each): {_stages(ours)}."
    )


def _complete_row(scenario: str, count: int, direct: Streams, ours: Streams) -> Row:
    return Row(
        key="streams_complete",
        scenario=scenario,
        measure="streams complete (every piece, in order, then done)",
        direct=f"{number(direct.complete)} of {number(count)} in {direct.span:.0f} s",
        dispatcher=f"{number(ours.complete)} of {number(count)} in {ours.span:.0f} s",
        target="all",
        met=ours.complete == count,
        figures={"clients": count, "complete": ours.complete, "seconds": ours.span},
    )


def _connections_row(scenario: str, before: dict[str, int], peak: dict[str, int]) -> Row:
    workers = {name: n for name, n in peak.items() if name.startswith("worker")}
    return Row(
        key="streams_redis",
        scenario=scenario,
        measure="Redis connections, most at once (CLIENT LIST)",
        direct="-",
        dispatcher=(
            f"API {peak['API']} (before {before['API']}); "
            + ", ".join(f"{name} {n}" for name, n in workers.items())
            + f"; all {peak['all']}"
        ),
        target=f"API <= {API_CONNECTIONS_CAP}",
        met=peak["API"] <= API_CONNECTIONS_CAP,
        figures={
            "api_connections": peak["API"],
            "all_connections": peak["all"],
            "worker_connections": sum(workers.values()),
        },
    )


def _latency_rows(scenario: str, direct: Streams, ours: Streams) -> list[Row]:
    rows = []
    for q in (50, 99):
        direct_ms, ours_ms = direct.pieces.percentile(q), ours.pieces.percentile(q)
        rows.append(
            Row(
                key=f"streams_piece_p{q}",
                scenario=scenario,
                measure=f"added latency per piece (model send -> client), p{q}",
                direct=f"{direct_ms:.1f} ms",
                dispatcher=f"{ours_ms:.1f} ms",
                ratio=f"{ours_ms - direct_ms:+.1f} ms",
                figures={"direct_ms": direct_ms, "dispatcher_ms": ours_ms},
            )
        )
    rows.append(
        Row(
            key="streams_first_event",
            scenario=scenario,
            measure="time to first event (request sent -> first piece), p50 / p99",
            direct=f"{direct.first.p50:.0f} / {direct.first.p99:.0f} ms",
            dispatcher=f"{ours.first.p50:.0f} / {ours.first.p99:.0f} ms",
            ratio=f"{ours.first.p50 - direct.first.p50:+.0f} ms (p50)",
            figures={"direct_p50_ms": direct.first.p50, "dispatcher_p50_ms": ours.first.p50},
        )
    )
    return rows
