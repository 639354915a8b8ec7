"""The engine (worker/engine.py) on a real redis-server, its model server a gated fake transport:
when the consumer may fetch, when a message counts as ended, what a drain leaves unacked."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from devstack import RedisServer, wait_until
from shared.models import PredictionCall
from shared.priorities import Priority
from shared.redis_state.keys import task_key
from shared.settings import Settings
from tests.support.upstream_fakes import Canned, answer
from tests.unit.shared.redis_state.make import submit as submit_records
from tests.unit.shared.redis_state.make import submit_task
from worker.engine import Engine

ORIGIN = "http://torchserve:8080"
WAIT = 10.0


class GatedUpstream:
    """A model server that holds every call until `release(n)` lets n of them answer."""

    def __init__(self) -> None:
        self.in_flight = 0
        self._tickets = threading.Semaphore(0)

    def release(self, count: int = 1) -> None:
        for _ in range(count):
            self._tickets.release()

    async def request(
        self, method: str, url: str, headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"", *, read_timeout: float | None = None,
        connect_timeout: float | None = None,
    ) -> Canned:  # fmt: skip
        self.in_flight += 1
        try:
            await asyncio.to_thread(self._tickets.acquire)
        finally:
            self.in_flight -= 1
        return answer(200, {"echo": body.decode()})

    async def aclose(self) -> None:
        pass


class Message:
    """A message's `done` as the consumer would get it, and the wake-ups of `on_room`."""

    def __init__(self) -> None:
        self.ended: list[bool] = []
        self.done = threading.Event()

    def __call__(self, ended: bool) -> None:
        self.ended.append(ended)
        self.done.set()


@pytest.fixture
def upstream() -> GatedUpstream:
    return GatedUpstream()


@pytest.fixture
def engine(dedicated_redis: RedisServer, upstream: GatedUpstream) -> Iterator[Engine]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=dedicated_redis.url,
        torchserve_url=ORIGIN,
        worker_max_in_flight=10,
        worker_max_calls_per_backend=2,
    )
    started = Engine(settings, "w1@test", transport=upstream)
    started.start()
    try:
        yield started
    finally:
        upstream.release(100)
        started.drain(WAIT)
        started.stop()


def queued_tasks(server: RedisServer, *task_ids: str) -> list[dict[str, Any]]:
    """Records (queued) for `task_ids`, and the message entries a worker would receive."""

    def run_async(call: Any) -> Any:
        async def main() -> Any:
            async with aioredis.Redis.from_url(server.url, decode_responses=True) as client:
                return await call(client)

        return asyncio.run(main())

    recorded = submit_records(run_async, *(submit_task(task_id) for task_id in task_ids))
    assert recorded == [1] * len(task_ids)
    now = time.time()
    call = PredictionCall(
        origin=ORIGIN, model_name="echo", model_version=None, body={"n": 1},
        deadline=now + 60, submitted_at=now, priority=Priority.default,
    )  # fmt: skip
    return [{"id": task_id, "call": call.model_dump(mode="json")} for task_id in task_ids]


def status(server: RedisServer, task_id: str) -> str:
    with server.client(decode_responses=True) as client:
        return str(client.hget(task_key(task_id), "status"))


def test_fetching_stops_while_a_task_waits_for_its_backend_and_resumes_when_it_has_a_slot(
    dedicated_redis: RedisServer, engine: Engine, upstream: GatedUpstream
) -> None:
    wakes: list[float] = []
    engine.on_room = lambda: wakes.append(time.monotonic())
    assert engine.has_room()
    message = Message()
    engine.submit(queued_tasks(dedicated_redis, "a", "b", "c"), message)
    wait_until(lambda: upstream.in_flight == 2, WAIT, "two calls at the backend's cap")
    assert engine.held == 3
    assert not engine.has_room()  # "c" waits for a slot: better left in Redis for others
    assert status(dedicated_redis, "c") == "queued"  # not STARTed: still cancelable
    assert not wakes
    upstream.release(1)
    wait_until(lambda: wakes, WAIT, "the consumer woken once every task has its slot")
    assert engine.has_room()
    upstream.release(2)
    assert message.done.wait(WAIT)
    assert message.ended == [True]
    assert {status(dedicated_redis, t) for t in "abc"} == {"succeeded"}
    assert engine.held == 0


def test_a_drain_finishes_the_running_calls_and_leaves_the_waiting_task_unstarted(
    dedicated_redis: RedisServer, engine: Engine, upstream: GatedUpstream
) -> None:
    message = Message()
    engine.submit(queued_tasks(dedicated_redis, "x", "y", "z"), message)
    wait_until(lambda: upstream.in_flight == 2, WAIT, "two calls in flight")
    draining = threading.Thread(target=engine.drain, args=(WAIT,))
    draining.start()
    time.sleep(0.1)
    assert not message.done.is_set()  # the drain waits for the running calls
    upstream.release(2)
    draining.join(WAIT)
    assert message.ended == [False]  # one task never started: the message must not be acked
    statuses = sorted(status(dedicated_redis, t) for t in "xyz")
    assert statuses == ["queued", "succeeded", "succeeded"]


def test_a_message_whose_tasks_cannot_be_read_is_dropped_as_ended(engine: Engine) -> None:
    message = Message()
    engine.submit([{"id": "broken", "call": {"model_name": 3}}], message)
    assert message.done.wait(WAIT)
    assert message.ended == [True]  # acked: no worker could ever run it
    assert engine.held == 0
    assert engine.has_room()
