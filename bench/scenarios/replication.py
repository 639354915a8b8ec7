"""(7b) What WAIT costs a submit: one API on the single redis-server, one on a Sentinel topology.

On Sentinel a submit is answered only once every live replica holds it (shared/replica_wait.py:
PUBLISH + WAIT after the write, on the same connection). This scenario measures that cost in
the same run and on the same machine: a second API process on a topology of 1 primary, 2
replicas and 3 sentinels (tests/support/sentinel.py, the fault tests' own), next to the run's
API on its single node. No worker runs (as in the submit-rate scenario): the figures are the
API's and Redis's alone. Both are measured in alternating rounds, so that a busy moment of the
machine falls on both sides alike:

- one caller, one async submit (202) at a time: the p50 and p99 a lone client sees;
- wrk, `plan.connections` connections: async submits per second.

The replicas run on the same 2 cores as everything else, so the rate ratio is a lower bound of
what separate machines give; the added latency is mostly the replicas' round trip.
"""

from __future__ import annotations

from bench.loadgen import run_wrk
from bench.progress import say
from bench.scenarios.context import TINY_DISPATCH_BODY, TINY_INPUT, Context
from bench.sequential import Latencies, measure
from bench.stack import TINY_MODEL
from bench.table import Row, number
from tests.support.sentinel import SentinelTopology

ACCEPTED = 202
ASYNC = {"Prefer": "respond-async"}
ROUNDS = 4
# Targets: WAIT adds at most this to a lone submit's p50, and keeps this share of the rate.
ADDED_P50_TARGET_MS = 1.0
RATE_RATIO_TARGET = 0.7


def run(ctx: Context) -> None:
    plan, stack = ctx.plan, ctx.stack
    ctx.stop_workers()
    say("replication: a Sentinel topology (1 primary, 2 replicas, 3 sentinels) ...")
    with SentinelTopology(ctx.run_dir / "sentinel") as topology:
        env = {**topology.env, "MAX_QUEUE_DEPTH": "10000000"}
        sentinel_api = stack.start_api(1, env=env, name="sentinel")
        try:
            apis = {
                "single": stack.dispatch_url(),
                "sentinel": f"{sentinel_api.url}/dispatch_model",
            }
            requests = max(20, plan.latency_requests // ROUNDS)
            body = {"model_name": TINY_MODEL, "input": TINY_INPUT}
            samples: dict[str, list[float]] = {side: [] for side in apis}
            rates: dict[str, list[float]] = {side: [] for side in apis}
            seconds = max(1.0, plan.submit_seconds / ROUNDS)
            for _ in range(ROUNDS):
                for side, url in apis.items():
                    lone = measure(
                        url, body, requests=requests, warmup=5, headers=ASYNC, expect=ACCEPTED
                    )
                    samples[side] += lone.samples_ms
                    loaded = run_wrk(
                        url, TINY_DISPATCH_BODY, connections=plan.connections, seconds=seconds,
                        headers=("Prefer: respond-async",),
                    )  # fmt: skip
                    rates[side].append(loaded.rate(ACCEPTED))
            replicas = _replicas_holding(topology)
        finally:
            sentinel_api.stop()
    stack.drop_queue()
    single, sentinel = Latencies(samples["single"], 0), Latencies(samples["sentinel"], 0)
    added = sentinel.p50 - single.p50
    rate_single = sum(rates["single"]) / ROUNDS
    rate_sentinel = sum(rates["sentinel"]) / ROUNDS
    ratio = rate_sentinel / rate_single if rate_single else 0.0
    say(
        f"  lone submit p50/p99: single {single.p50:.2f}/{single.p99:.2f} ms, Sentinel "
        f"{sentinel.p50:.2f}/{sentinel.p99:.2f} ms (+{added:.2f} ms p50); rate: single "
        f"{rate_single:.0f}/s, Sentinel {rate_sentinel:.0f}/s ({ratio:.2f}); the last submit on "
        f"{replicas} replica(s)"
    )
    ctx.rows += [
        Row(
            key="replication_latency",
            scenario="submit on Sentinel, WAIT for every replica (2), 1 caller",
            measure="async POST (202) p50 / p99 ms; direct = single redis-server",
            direct=f"{single.p50:.2f} / {single.p99:.2f} ms",
            dispatcher=f"{sentinel.p50:.2f} / {sentinel.p99:.2f} ms (+{added:.2f} p50)",
            target=f"+<= {ADDED_P50_TARGET_MS:g} ms p50",
            met=added <= ADDED_P50_TARGET_MS,
            figures={
                "single_p50_ms": single.p50,
                "single_p99_ms": single.p99,
                "sentinel_p50_ms": sentinel.p50,
                "sentinel_p99_ms": sentinel.p99,
                "added_p50_ms": added,
                "replicas": replicas,
            },
        ),
        Row(
            key="replication_rate",
            scenario=f"submit rate on Sentinel, 1 API process, wrk {plan.connections} conn.",
            measure="async POST (202) req/s; direct = single redis-server",
            direct=f"{number(rate_single)} req/s",
            dispatcher=f"{number(rate_sentinel)} req/s ({ratio:.2f})",
            target=f">= {RATE_RATIO_TARGET:g} of single",
            met=ratio >= RATE_RATIO_TARGET,
            figures={"single_rps": rate_single, "sentinel_rps": rate_sentinel, "ratio": ratio},
        ),
    ]


def _replicas_holding(topology: SentinelTopology) -> int:
    """How many replicas hold every write so far (the submits among them): WAIT's own count."""
    with topology.primary().client() as client:
        return int(client.execute_command("WAIT", len(topology.nodes) - 1, 2_000))
