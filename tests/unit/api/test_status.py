"""`api/status.collect` on a real redis-server: tasks written by the real scripts show up in the
figures per class, workers live and gone, batches in progress and the backends' health (the model
server faked with a transport)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from api.backend_probe import BackendProbe
from api.status import StatusView, collect
from devstack.redis import RedisServer
from shared.errors import ModelNotFound
from shared.priorities import Priority
from shared.redis_state.keys import GONE_WORKERS_KEY, WORKERS_KEY, worker_info_key
from shared.redis_state.record import Outcome
from shared.settings import Settings
from tests.unit.shared.redis_state.make import (
    create_batch,
    finish,
    item,
    start,
    submit,
    submit_task,
)


@pytest.fixture
def r(bare_redis: RedisServer) -> Iterator[redis.Redis]:
    client = bare_redis.client(decode_responses=True)
    client.flushall()
    yield client
    client.close()


def run_async(bare_redis: RedisServer):  # type: ignore[no-untyped-def]
    def run(call):  # type: ignore[no-untyped-def]
        async def main():  # type: ignore[no-untyped-def]
            async with aioredis.Redis.from_url(bare_redis.url, decode_responses=True) as client:
                return await call(client)

        return asyncio.run(main())

    return run


def read_status(bare_redis: RedisServer, ping_status: int = 200) -> StatusView:
    settings = Settings(redis_url=bare_redis.url, worker_heartbeat_interval=2.0)

    async def main() -> StatusView:
        transport = httpx.MockTransport(lambda request: httpx.Response(ping_status))
        async with (
            httpx.AsyncClient(transport=transport) as http,
            aioredis.Redis.from_url(bare_redis.url, decode_responses=True) as client,
        ):
            return await collect(client, settings, BackendProbe(http, settings.backend_map))

    return asyncio.run(main())


def test_the_figures_per_class(bare_redis: RedisServer, r: redis.Redis) -> None:
    runner = run_async(bare_redis)
    tasks = [submit_task(f"i{n}", priority=Priority.interactive) for n in range(3)]
    tasks += [submit_task(f"d{n}") for n in range(4)]
    submit(runner, *tasks)
    start(r, "i0", "i1", "d0")
    finish(r, Outcome.succeeded("i0", 1), Outcome.failed("d0", ModelNotFound("no such model")))
    status = read_status(bare_redis)
    by_class = {c.priority: c for c in status.classes}
    interactive, default = by_class[Priority.interactive], by_class[Priority.default]
    assert (interactive.queued, interactive.in_flight) == (1, 1)
    assert (default.queued, default.in_flight) == (3, 0)
    assert interactive.endings_5m["succeeded"] == 1
    assert default.endings_5m["failed"] == 1
    assert default.failures_by_code_5m == {"model_not_found": 1}
    assert interactive.submitted_per_second_1m == pytest.approx(3 / 60)
    assert interactive.queue_wait.count == 2
    assert interactive.end_to_end.count == 1
    assert interactive.end_to_end.p50 is not None
    assert sum(p.submitted for p in status.chart) == 7
    assert sum(p.failed for p in status.chart) == 1
    assert len(status.chart) == 90
    assert [b.health for b in status.backends] == ["ok"]
    assert status.backends[0].calls_5m == 2


def test_an_unhealthy_backend_says_why(bare_redis: RedisServer, r: redis.Redis) -> None:
    (backend,) = read_status(bare_redis, ping_status=503).backends
    assert backend.health.endswith("answered 503")


def test_workers_live_and_gone(bare_redis: RedisServer, r: redis.Redis) -> None:
    now = time.time()
    r.zadd(WORKERS_KEY, {"w1@host": now - 1, "late@host": now - 60})
    r.hset(worker_info_key("w1@host"), mapping={"host": "host", "pid": "42", "queues": "dispatch",
                                                "slots": "64", "in_flight": "3"})  # fmt: skip
    r.zadd(GONE_WORKERS_KEY, {"old@host": now - 600})
    workers = {w.name: w for w in read_status(bare_redis).workers}
    assert workers["w1@host"].live
    assert (workers["w1@host"].pid, workers["w1@host"].in_flight) == (42, 3)
    assert workers["w1@host"].queues == ["dispatch"]
    assert not workers["late@host"].live  # its beat is older than LIVE_BEATS intervals
    assert not workers["old@host"].live
    assert workers["old@host"].last_beat_seconds == pytest.approx(600, abs=5)
    assert [w.live for w in read_status(bare_redis).workers] == [True, False, False]


def test_batches_in_progress(bare_redis: RedisServer, r: redis.Redis) -> None:
    runner = run_async(bare_redis)
    create_batch(runner, "b1", [item("a"), item("b")])
    start(r, "b1-0")
    finish(r, Outcome.succeeded("b1-0", 1))
    (batch,) = read_status(bare_redis).batches
    assert (batch.batch_id, batch.total, batch.ended) == ("b1", 2, 1)
    assert batch.counts["succeeded"] == 1
    assert batch.counts["queued"] == 1
    start(r, "b1-1")
    finish(r, Outcome.succeeded("b1-1", 1))
    assert read_status(bare_redis).batches == []
