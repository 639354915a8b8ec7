"""(5) Thousands of clients waiting at once on one API process: threads flat, memory bounded."""

from __future__ import annotations

from bench.machine import rss_mb, threads
from bench.progress import say
from bench.sampler import Sampler, footprint_rows
from bench.scenarios.burst import wait_bound
from bench.scenarios.context import SLOW_DISPATCH_BODY, SLOW_SECONDS, TINY_DISPATCH_BODY, Context
from bench.shots import Volley, fire
from bench.table import Row, number

RSS_GROWTH_TARGET_MB = 200.0
WARMUP_REQUESTS = 200


def run(ctx: Context) -> None:
    plan, stack = ctx.plan, ctx.stack
    count = plan.waiting_clients
    capacity = plan.slow_workers / SLOW_SECONDS
    wait = wait_bound(count, capacity)
    pid = stack.api_server.pid
    # Warm the API (FastAPI's threadpool, Redis pool, allocator) so growth means waiting clients.
    fire(Volley(stack.dispatch_url(), TINY_DISPATCH_BODY.encode(), WARMUP_REQUESTS), 1)
    threads_before, rss_before = threads(pid), rss_mb(pid)
    say(
        f"waiting clients: {count} concurrent sync requests on the slow model, opened over "
        f"{plan.waiting_ramp_seconds:g} s (ideal {count / capacity:.0f} s) ..."
    )
    volley = Volley(
        stack.dispatch_url(),
        SLOW_DISPATCH_BODY.encode(),
        count,
        headers=(("Prefer", f"wait={wait:g}"),),
        ramp=plan.waiting_ramp_seconds,
        timeout=wait + 15,
    )
    mark = ctx.log_mark()
    with Sampler(pid) as sampler:
        result = fire(volley, plan.client_processes)
    ctx.report_log_problems(mark, "Waiting clients")
    succeeded = result.count(200)
    threads_max, rss_max = max(sampler.thread_counts), max(sampler.rss)
    say(
        f"  {succeeded}/{count} succeeded in {result.span:.1f} s; API threads {threads_before} -> "
        f"max {threads_max}; RSS {rss_before:.0f} -> max {rss_max:.0f} MB"
    )
    if result.errors:
        ctx.notes.append(f"Waiting clients: client-side errors {dict(result.errors)}.")
    scenario = f"waiting clients, {number(count)} concurrent, slow model, 1 API process"
    ctx.rows += [
        Row(
            key="waiting_succeeded",
            scenario=scenario,
            measure="succeeded",
            direct="-",
            dispatcher=f"{number(succeeded)} of {number(count)} in {result.span:.0f} s",
            target="all",
            met=succeeded == count,
            figures={"succeeded": succeeded, "seconds": result.span},
        ),
        *footprint_rows(
            "waiting", scenario, "API", sampler, threads_before, rss_before, RSS_GROWTH_TARGET_MB
        ),
    ]
