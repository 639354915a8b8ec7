"""(7) Async submit rate on one API process, then the pub/sub subscription check of the run."""

from __future__ import annotations

from bench import profiling
from bench.loadgen import WrkResult, run_wrk
from bench.progress import say
from bench.scenarios.context import TINY_DISPATCH_BODY, Context, CpuMeter
from bench.table import Row, number
from shared.redis_state.keys import FINISHED_CHANNEL

SUBMIT_TARGET = 5_000.0  # async submits per second, one API process
ACCEPTED = 202


def run(ctx: Context) -> None:
    plan, stack = ctx.plan, ctx.stack
    # No worker runs: the figure is the API's alone, not the API sharing 2 cores with workers.
    ctx.stop_workers()
    say(
        f"submit rate: async POST /dispatch_model (Prefer: respond-async), wrk "
        f"{plan.connections} connections, {plan.submit_seconds:g} s, no workers running ..."
    )
    with CpuMeter(ctx.processes()) as cpu:
        result = _submit(ctx)
    say(f"  {result.describe(ACCEPTED)}; CPU: {cpu.describe()}")
    ctx.notes.append(
        f"CPU during the submit-rate run (% of one core): {cpu.describe()}; per accepted "
        f"request: {cpu.per_request(result.rate(ACCEPTED))}."
    )
    if plan.profile:
        _profile(ctx)
    dropped = stack.drop_queue()
    rate = result.rate(ACCEPTED)
    ctx.rows.append(
        Row(
            key="submit",
            scenario="submit rate, 1 API process",
            measure="async POST (202) req/s",
            direct="-",
            dispatcher=f"{number(rate)} req/s",
            target=f">= {number(SUBMIT_TARGET)}",
            met=rate >= SUBMIT_TARGET,
            figures={"accepted_rps": rate, "queued": dropped},
        )
    )


def _submit(ctx: Context) -> WrkResult:
    return run_wrk(
        ctx.stack.dispatch_url(),
        TINY_DISPATCH_BODY,
        connections=ctx.plan.connections,
        seconds=ctx.plan.submit_seconds,
        headers=("Prefer: respond-async",),
    )


def _profile(ctx: Context) -> None:
    """The submit load again with py-spy on the API (not timed)."""
    seconds = ctx.plan.submit_seconds
    say(f"profile: py-spy on the API during {seconds:g} s of async submits ...")
    output = ctx.run_dir / "profiles" / "API-submit.txt"
    recording = profiling.start_recording(ctx.stack.api_server.pid, seconds, output)
    loaded = _submit(ctx)
    profiling.finish_recording(recording, seconds)
    summary = profiling.summarize("API, async submits", profiling.Profile.load(output, seconds))
    ctx.profile += [*summary, "", f"(Profiled run: {loaded.describe(ACCEPTED)}.)", ""]


def check_subscriptions(ctx: Context) -> None:
    """After every scenario: Redis must hold the API's one subscription and nothing else."""
    with ctx.stack.client() as client:
        channels = sorted(client.pubsub_channels())
        subscribers = dict(client.pubsub_numsub(*channels)) if channels else {}
        patterns = int(client.pubsub_numpat())
    say(
        f"pub/sub after the run: channels {channels}, subscribers {subscribers}, "
        f"patterns {patterns}"
    )
    only_ours = channels == [FINISHED_CHANNEL] and subscribers.get(FINISHED_CHANNEL) == 1
    ctx.rows.append(
        Row(
            key="pubsub",
            scenario="subscriptions left after the run",
            measure="Redis PUBSUB CHANNELS / NUMSUB",
            direct="-",
            dispatcher=(
                f"{len(channels)} channel(s), "
                + ", ".join(f"{name}: {count}" for name, count in subscribers.items())
                + (f", {patterns} patterns" if patterns else "")
            ),
            target=f"only {FINISHED_CHANNEL} (1 API)",
            met=only_ours and patterns == 0,
            figures={"channels": len(channels), "subscribers": sum(subscribers.values()) or 0},
        )
    )
