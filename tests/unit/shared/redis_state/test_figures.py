"""The console's bounded figures, written by the real scripts on a bare redis-server: bucket
edges, window roll-over, several API processes adding to one set, memory after 100,000 tasks."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from devstack.redis import RedisServer
from shared.celery_app import encode_message
from shared.errors import ModelNotFound
from shared.models import TaskStatus
from shared.priorities import Priority, queue_of
from shared.redis_state.figures import (
    Window,
    bin_of,
    bucket_start,
    percentile,
    read_window,
)
from shared.redis_state.keys import (
    FIGURE_EDGES,
    FIGURES_BUCKET_SECONDS,
    FIGURES_KEEP_SECONDS,
    FIGURES_KEY_PREFIX,
    RECENT_FAILED_KEY,
    RECENT_KEY,
    RECENT_LIMIT,
    figures_key,
    running_key,
)
from shared.redis_state.record import Outcome
from shared.redis_state.status_scripts import QueueOldest
from shared.redis_state.task_scripts import (
    FinishTasks,
    StartTasks,
    StartTerms,
    SubmitTask,
    SubmitTasks,
)
from tests.unit.shared.redis_state.make import (
    EXPIRED,
    IDEMPOTENCY_TTL,
    OVERRAN,
    TTL,
    RunAsync,
    finish,
    new_task,
    start,
    submit,
    submit_task,
)


def counts(r: redis.Redis, now: float) -> dict[str, int]:
    raw: dict[str, str] = r.hgetall(figures_key(str(bucket_start(now))))  # type: ignore[assignment]
    return {k: int(v) for k, v in raw.items()}


def window(run_async: RunAsync, now: float) -> Window:
    result: Window = run_async(lambda client: read_window(client, now))
    return result


def test_python_bins_are_the_scripts_bins(r: redis.Redis, run_async: RunAsync) -> None:
    # Durations just either side of every edge, and beyond the last one.
    durations = [edge * f for edge in FIGURE_EDGES for f in (0.999, 1.001)] + [7200.0]
    for n, duration in enumerate(durations):
        task = submit_task(f"t{n}", deadline_in=10_000)
        created = float(task.fields[task.fields.index("created_at") + 1])
        submit(run_async, task)
        start(r, f"t{n}", now=created + duration)
    seen: dict[int, int] = {}
    for key in r.scan_iter(FIGURES_KEY_PREFIX + "*"):
        for field, value in r.hgetall(key).items():  # type: ignore[union-attr]
            if field.startswith("wait:default:"):
                index = int(field.rsplit(":", 1)[1])
                seen[index] = seen.get(index, 0) + int(value)
    expected: dict[int, int] = {}
    for duration in durations:
        expected[bin_of(duration)] = expected.get(bin_of(duration), 0) + 1
    assert seen == expected
    assert bin_of(FIGURE_EDGES[0] * 0.999) == 0
    assert bin_of(7200.0) == len(FIGURE_EDGES)


def test_percentiles_interpolate_inside_a_bin() -> None:
    # 100 durations in the bin (0.1, 0.25]: the median is halfway through it.
    index = FIGURE_EDGES.index(0.25)
    assert percentile({index: 100}, 0.5) == pytest.approx(0.175)
    assert percentile({0: 50, index: 50}, 0.25) == pytest.approx(FIGURE_EDGES[0] / 2)
    assert percentile({len(FIGURE_EDGES): 3}, 0.99) == FIGURE_EDGES[-1]
    assert percentile({}, 0.5) is None


def test_a_task_is_counted_from_submit_to_ending(r: redis.Redis, run_async: RunAsync) -> None:
    ok, bad = submit_task("ok", priority=Priority.interactive), submit_task("bad")
    submit(run_async, ok, bad)
    now = time.time()
    assert counts(r, now)["submitted:interactive"] == 1
    assert counts(r, now)["submitted:default"] == 1
    start(r, "ok", "bad")
    assert r.get(running_key(queue_of(Priority.interactive))) == "1"
    finish(r, Outcome.succeeded("ok", {"y": 1}), Outcome.failed("bad", ModelNotFound("gone")))
    figures = counts(r, time.time())
    assert figures["ended:interactive:succeeded"] == 1
    assert figures["ended:default:failed"] == 1
    assert figures["code:default:model_not_found"] == 1
    assert sum(v for k, v in figures.items() if k.startswith("run:interactive:")) == 1
    assert sum(v for k, v in figures.items() if k.startswith("e2e:default:")) == 1
    assert sum(v for k, v in figures.items() if k.startswith("backend:torchserve:")) == 2
    assert r.get(running_key(queue_of(Priority.interactive))) == "0"
    assert r.lrange(RECENT_KEY, 0, -1) == ["bad", "ok"]
    assert r.lrange(RECENT_FAILED_KEY, 0, -1) == ["bad"]
    assert 0 < r.ttl(figures_key(str(bucket_start(time.time())))) <= FIGURES_KEEP_SECONDS


def test_a_full_class_counts_its_refusals(r: redis.Redis, run_async: RunAsync) -> None:
    assert submit(run_async, submit_task("a"), submit_task("b"), max_depth=1) == [1, 0]
    assert counts(r, time.time())["refused:default"] == 1
    assert counts(r, time.time())["submitted:default"] == 1


def test_the_window_rolls_over(r: redis.Redis, run_async: RunAsync) -> None:
    now = time.time()
    submit(run_async, submit_task("a"))
    current = window(run_async, now)
    assert current.total("submitted:default", 60) == 1
    assert current.rate("submitted:default", 60) == pytest.approx(1 / 60)
    # The same bucket, seen from 61 s later: out of the last minute, still in the last 5.
    later = window(run_async, bucket_start(now) + FIGURES_BUCKET_SECONDS + 60.5)
    assert later.total("submitted:default", 60) == 0
    assert later.total("submitted:default", 300) == 1
    # 15 minutes later it is out of the chart: the window reads only 90 buckets.
    gone = window(run_async, bucket_start(now) + 15 * 60 + FIGURES_BUCKET_SECONDS)
    assert len(gone.buckets) == 90
    assert gone.total("submitted:default", 15 * 60) == 0


def test_several_api_processes_add_to_one_set(bare_redis: RedisServer, r: redis.Redis) -> None:
    """Four clients (as four API processes would) submit 50 tasks each at once: the figures
    count all 200, in the bucket each submit fell in."""

    async def process(n: int) -> None:
        async with aioredis.Redis.from_url(bare_redis.url, decode_responses=True) as client:
            script = SubmitTasks(client)
            for i in range(50):
                task = submit_task(f"p{n}-{i}")
                await script(
                    [task], {task.queue: json.dumps([task.task_id])}, max_depth=10_000,
                    ttl=TTL, idempotency_ttl=IDEMPOTENCY_TTL,
                )  # fmt: skip

    async def main() -> None:
        await asyncio.gather(*(process(n) for n in range(4)))

    asyncio.run(main())
    total = sum(
        int(r.hget(key, "submitted:default") or 0)  # type: ignore[arg-type]
        for key in r.scan_iter(FIGURES_KEY_PREFIX + "*")
    )
    assert total == 200
    assert r.llen(RECENT_KEY) == 200


def test_queue_oldest_reads_the_oldest_message(r: redis.Redis, run_async: RunAsync) -> None:
    first, second = submit_task("first"), submit_task("second")
    submit(run_async, first)
    submit(run_async, second)
    queue = first.queue
    r.delete(queue)  # the test helper's messages are id lists; push real envelopes instead
    for task in (first, second):
        r.lpush(queue, encode_message([{"id": task.task_id, "call": {}, "headers": {}}]))
    created = float(first.fields[first.fields.index("created_at") + 1])
    empty = queue_of(Priority.batch)
    oldest: list[float | None] = run_async(lambda c: QueueOldest(c)([queue, empty]))
    assert oldest == [pytest.approx(created), None]


def _spread_tasks(client: redis.Redis, total: int, span: float, group: int = 500) -> None:
    """`total` tasks through submit, start and finish, their times spread evenly over the last
    `span` seconds, `group` per script call (as group commit and a busy worker do)."""

    async def main() -> None:
        kwargs = client.connection_pool.connection_kwargs
        async with aioredis.Redis(host=kwargs["host"], port=kwargs["port"]) as aclient:
            submit_script, start_script = SubmitTasks(aclient), StartTasks(aclient)
            finish_script = FinishTasks(aclient)
            terms = StartTerms(3, TTL, "w1@host", EXPIRED, OVERRAN)
            begin = time.time() - span
            for g in range(0, total, group):
                at = begin + span * g / total
                tasks = []
                for i in range(g, min(g + group, total)):
                    new = new_task(priority=list(Priority)[i % 3], deadline_in=span + 600)
                    fields = new.fields(at, "alice")
                    tasks.append(SubmitTask(f"m{i}", queue_of(new.priority), fields))
                messages: dict[str, Any] = {t.queue: "[]" for t in tasks}
                await submit_script(
                    tasks, messages, max_depth=10**9, ttl=TTL, idempotency_ttl=IDEMPOTENCY_TTL
                )
                ids = [t.task_id for t in tasks]
                await start_script(ids, terms, at + 0.01)
                outcomes = [
                    Outcome.succeeded(i, 1) if n % 10 else Outcome.failed(i, ModelNotFound("x"))
                    for n, i in enumerate(ids)
                ]
                await finish_script(outcomes, now=at + 0.05, ttl=TTL)

    asyncio.run(main())


def test_memory_stays_bounded_after_100000_tasks(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """100,000 tasks over the last 15 minutes: the figures are one hash per 10-s bucket (91 at
    most), and the recent lists keep RECENT_LIMIT ids, whatever the count."""
    with RedisServer(tmp_path_factory.mktemp("figures-redis"), appendonly=False) as server:
        client = server.client(decode_responses=True)
        _spread_tasks(client, 100_000, 15 * 60 - FIGURES_BUCKET_SECONDS)
        keys = list(client.scan_iter(FIGURES_KEY_PREFIX + "*", count=1000))
        assert len(keys) <= 91
        figures_bytes = sum(int(client.memory_usage(k) or 0) for k in keys)
        lists_bytes = sum(int(client.memory_usage(k) or 0) for k in (RECENT_KEY, RECENT_FAILED_KEY))
        assert client.llen(RECENT_KEY) == RECENT_LIMIT
        assert client.llen(RECENT_FAILED_KEY) == RECENT_LIMIT
        print(
            f"\nFIGURES after 100,000 tasks: {len(keys)} hashes, {figures_bytes:,} bytes "
            f"(MEMORY USAGE); recent lists {lists_bytes:,} bytes"
        )
        # Every bucket holds the same kinds of fields whatever passes through it: 3 classes x
        # (counters + 3 histograms of at most 19 bins) + one backend's bins.
        assert figures_bytes < 1_000_000, figures_bytes
        assert lists_bytes < 200_000, lists_bytes
        statuses = {client.hget(f"dispatch:task:m{i}", "status") for i in range(0, 100_000, 997)}
        assert statuses <= {TaskStatus.succeeded.value, TaskStatus.failed.value}
        client.close()
