"""(11) Long calls through ONE worker process: how many a process keeps in flight at once.

LLM servers batch hundreds of concurrent requests lasting seconds each; what keeps one busy is
how many calls the dispatcher holds open at once, not how fast it turns a short one around.
`long_calls` tasks are submitted at once to a stand-in model server (devstack/upstream.py) that
holds every call `long_call_seconds` and can hold any number; one worker process runs them.
Reported: how many ended within `long_calls_budget` seconds, the most calls the upstream saw
in flight at once, and the worker process's threads and RSS meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx

from bench.progress import say
from bench.sampler import Sampler, footprint_rows
from bench.scenarios.context import Context
from bench.table import Row, number
from shared.models import TaskStatus

RSS_GROWTH_TARGET_MB = 150.0
SUBMITS_AT_ONCE = 64
POLL_SECONDS = 30.0
MODEL = "long"


async def _submit(client: httpx.AsyncClient, gate: asyncio.Semaphore, n: int) -> str:
    async with gate:
        response = await client.post(
            "/dispatch_model",
            json={"model_name": MODEL, "input": {"n": n}},
            headers={"Prefer": "respond-async"},
        )
    response.raise_for_status()
    task_id: str = response.json()["task_id"]
    return task_id


async def _until_ended(client: httpx.AsyncClient, task_id: str, deadline: float) -> str:
    """The task's status once it ended, or as it is at `deadline` (long-polls in between)."""
    status = TaskStatus.queued.value
    while (left := deadline - time.monotonic()) > 0:
        response = await client.get(f"/tasks/{task_id}", params={"wait": min(left, POLL_SECONDS)})
        status = response.json()["status"]
        if TaskStatus(status).terminal:
            break
    return status


async def _play(url: str, count: int, budget: float) -> tuple[list[str], Counter[str], float]:
    # No keep-alive: a long-poll ends after up to 30 s, and a connection reused after uvicorn's
    # keep-alive timeout closed it would be a read error, not an answer.
    limits = httpx.Limits(max_connections=count + SUBMITS_AT_ONCE, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=POLL_SECONDS + 30) as client:
        gate = asyncio.Semaphore(SUBMITS_AT_ONCE)
        started = time.monotonic()
        ids = await asyncio.gather(*(_submit(client, gate, n) for n in range(count)))
        deadline = started + budget
        statuses = await asyncio.gather(*(_until_ended(client, t, deadline) for t in ids))
        elapsed = time.monotonic() - started
        left = [task_id for task_id, status in zip(ids, statuses, strict=True)
                if not TaskStatus(status).terminal]  # fmt: skip
        await asyncio.gather(*(client.delete(f"/tasks/{task_id}") for task_id in left))
    return left, Counter(statuses), elapsed


def run(ctx: Context) -> None:
    plan, stack = ctx.plan, ctx.stack
    count, seconds, budget = plan.long_calls, plan.long_call_seconds, plan.long_calls_budget
    ctx.stop_workers()  # one worker process, and only it, takes these calls
    upstream = stack.start_upstream(seconds)
    env = {"TORCHSERVE_URL": upstream.url}
    api = stack.start_api(1, env=env, name="long-calls")
    # Slots for every call at once: the scenario asks whether one process can hold them all.
    slots = {"WORKER_MAX_IN_FLIGHT": str(count), "WORKER_MAX_CALLS_PER_BACKEND": str(count)}
    (worker,) = stack.start_workers(1, plan.concurrency, plan.pool, env={**env, **slots})
    say(
        f"long calls: {count} calls of {seconds:g} s at once through one worker "
        f"({plan.pool} x {plan.concurrency}), at most {budget:g} s ..."
    )
    with Sampler(worker.pid) as sampler:
        threads_before, rss_before = sampler_first(sampler)
        left, statuses, elapsed = asyncio.run(_play(api.url, count, budget))
    stats = httpx.get(f"{upstream.url}/stats", timeout=10).json()
    succeeded = statuses.get(TaskStatus.succeeded.value, 0)
    say(
        f"  {succeeded} of {count} succeeded in {elapsed:.1f} s ({dict(statuses)}); upstream: "
        f"at most {stats['peak']} in flight; worker threads {threads_before} -> "
        f"{max(sampler.thread_counts)}, RSS {rss_before:.0f} -> {max(sampler.rss):.0f} MB"
    )
    stack.stop_workers([worker])
    api.stop()
    upstream.stop()
    stack.drop_queue()  # the scenarios after this one start without workers
    scenario = f"{number(count)} concurrent calls of {seconds:g} s through ONE worker process"
    ideal = f"ideal: all in {seconds:g} s (the stand-in server holds any number at once)"
    ctx.notes.append(
        f"Long calls: {len(left)} of {count} had not ended after {budget:g} s and were canceled; "
        f"the most calls in flight at the stand-in server: {stats['peak']} (one worker, "
        f"{plan.pool} x {plan.concurrency})."
    )
    ctx.rows += [
        Row(
            key="long_calls",
            scenario=scenario,
            measure=f"succeeded within {budget:g} s; most in flight at once",
            direct=ideal,
            dispatcher=f"{succeeded} of {count} in {elapsed:.0f} s; {stats['peak']} in flight",
            target="all",
            met=succeeded == count,
            figures={"calls": count, "succeeded": succeeded, "peak_in_flight": stats["peak"]},
        ),
        *footprint_rows(
            "long_calls",
            scenario,
            "worker",
            sampler,
            threads_before,
            rss_before,
            RSS_GROWTH_TARGET_MB,
        ),
    ]


def sampler_first(sampler: Sampler) -> tuple[int, float]:
    """The first sample (taken as the sampler starts): the worker before any call."""
    deadline = time.monotonic() + 5
    while not sampler.rss and time.monotonic() < deadline:
        time.sleep(0.01)
    return sampler.thread_counts[0], sampler.rss[0]
