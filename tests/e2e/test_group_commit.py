"""Group commit and messages of several tasks, against a real redis-server (and real workers).

- Concurrent submits of one API process share one task_submit call and one message per class;
  a lone submit goes at once, alone. Per task: its own depth check, record and idempotency key.
- A message of several tasks runs each once; a redelivered copy re-runs only the tasks whose
  records have not ended (START skips the others).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from api.idempotency import IdempotencyClaim, Replay
from api.store import ApiStore, new_task_id
from devstack import CeleryWorker, RedisServer, wait_until
from shared.backends import TORCHSERVE, default_target
from shared.celery_app import TASK_PREDICT_MANY
from shared.errors import QueueFull
from shared.models import PredictionRequest, TaskStatus
from shared.priorities import QUEUES, Priority
from shared.redis_state.keys import (
    FINISHED_CHANNEL,
    KOMBU_UNACKED_KEY,
    PUBLISH_INLINE_BYTES,
    queued_key,
    task_key,
)
from shared.settings import Settings
from tests.support.faults import model_calls, records, wait_terminal
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

QUEUE = QUEUES[Priority.default]


def settings_for(redis_url: str, **overrides: Any) -> Settings:
    fields: dict[str, Any] = {"torchserve_url": "http://127.0.0.1:9", **overrides}
    return Settings(_env_file=None, redis_url=redis_url, **fields)


def request(n: int, model: str = "echo", **fields: Any) -> PredictionRequest:
    fields = {"model_name": model, "input": {"id": n}, "priority": Priority.default, **fields}
    return PredictionRequest(**fields)


def messages(client: redis.Redis, queue: str = QUEUE) -> list[list[dict[str, Any]]]:
    """The tasks of each message in `queue`, oldest message first."""
    found = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        envelope = json.loads(raw)
        assert envelope["headers"]["task"] == TASK_PREDICT_MANY
        _, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        found.append(kwargs["tasks"])
    return found


async def submit_all(store: ApiStore, requests: list[PredictionRequest], **kw: Any) -> list[Any]:
    """Submit concurrently, as concurrent HTTP requests would; each outcome or its exception."""
    target = default_target(store._settings.backend_map[TORCHSERVE])
    return await asyncio.gather(
        *(store.submit(r, target, "", new_task_id(), **kw) for r in requests),
        return_exceptions=True,
    )


async def _grouping(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    store = ApiStore(client, settings_for(redis_url, message_max_tasks=16))
    try:
        lone = await submit_all(store, [request(0)])
        # 21 at once: the first is written alone (the API was idle); the other 20 arrive while
        # it is in flight and go in the next calls, at most 16 to a message.
        crowd = await submit_all(store, [request(n) for n in range(1, 22)])
    finally:
        await client.aclose()
    assert all(view.status is TaskStatus.queued for view in [*lone, *crowd]), [*lone, *crowd]


def test_concurrent_submits_share_messages_and_a_lone_one_goes_alone(
    dedicated_redis: RedisServer,
) -> None:
    asyncio.run(_grouping(dedicated_redis.url))
    client = dedicated_redis.client()
    sizes = [len(tasks) for tasks in messages(client)]
    assert sizes == [1, 1, 16, 4], sizes
    carried = [task["id"] for tasks in messages(client) for task in tasks]
    assert len(set(carried)) == 22
    assert client.get(queued_key(QUEUE)) == b"22"  # depth counts tasks, not messages
    assert all(fields["status"] == "queued" for fields in records(client, carried).values())
    # Each task carries its own call; none shares another's body.
    inputs = [task["call"]["body"]["id"] for tasks in messages(client) for task in tasks]
    assert sorted(inputs) == list(range(22))


async def _lingering(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    busy = False
    settings = settings_for(redis_url, submit_linger_ms=50, message_max_tasks=4)
    store = ApiStore(client, settings, busy=lambda: busy)
    try:
        await submit_all(store, [request(n) for n in range(3)])  # idle: 1, then 2
        busy = True
        await submit_all(store, [request(n) for n in range(3)])  # busy: all 3 together
        await submit_all(store, [request(n) for n in range(6)])  # a full group goes at once
    finally:
        await client.aclose()


def test_a_busy_api_lingers_so_submits_share_a_write(dedicated_redis: RedisServer) -> None:
    started = time.monotonic()
    asyncio.run(_lingering(dedicated_redis.url))
    sizes = [len(tasks) for tasks in messages(dedicated_redis.client())]
    assert sizes == [1, 2, 3, 4, 2], sizes
    assert time.monotonic() - started < 5


async def _limits(redis_url: str) -> tuple[list[Any], list[Any]]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    store = ApiStore(client, settings_for(redis_url, max_queue_depth=10))
    claim = IdempotencyClaim(f"dispatch:idempotency:test:{uuid.uuid4().hex}", "fingerprint")
    try:
        keyed = await submit_all(store, [request(n) for n in range(3)], idempotency=claim)
        limited = await submit_all(store, [request(n) for n in range(12)])
    finally:
        await client.aclose()
    return keyed, limited


def test_each_task_of_a_group_has_its_own_depth_check_and_idempotency_key(
    dedicated_redis: RedisServer,
) -> None:
    keyed, limited = asyncio.run(_limits(dedicated_redis.url))
    # One key, three concurrent submits: one task; the two in the second group replay it.
    created = [view for view in keyed if not isinstance(view, BaseException)]
    assert len(created) == 1
    assert all(isinstance(other, Replay) for other in keyed if other is not created[0])
    assert {other.task_id for other in keyed if isinstance(other, Replay)} == {created[0].task_id}
    # 1 queued + 12 against a limit of 10: 9 more fit, 3 are refused, in whichever group.
    refused = [outcome for outcome in limited if isinstance(outcome, QueueFull)]
    assert len(refused) == 3
    client = dedicated_redis.client()
    assert client.get(queued_key(QUEUE)) == b"10"
    carried = [task["id"] for tasks in messages(client) for task in tasks]
    recorded = [task_id for task_id, fields in records(client, carried).items() if fields]
    assert len(recorded) == 10  # the refused ones and the replays left no record


def test_a_redelivered_message_reruns_only_the_tasks_that_have_not_ended(
    stack_factory: StackFactory, counting_log: Path
) -> None:
    stack = stack_factory.start(workers=0, webhook_consumers=0)
    client = stack_factory.redis_server.client()
    run = uuid.uuid4().hex[:10]

    async def three() -> list[Any]:
        redis_url = stack.env["REDIS_URL"]
        aclient = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = ApiStore(
            aclient, settings_for(redis_url, torchserve_url=stack.env["TORCHSERVE_URL"])
        )
        # The first submit is written alone (the store is idle); the three gathered with it
        # arrive while it is in flight, so they share the next call and one message.
        tasks = [request(0, "counting")] + [
            request(0, "counting", input={"id": f"{run}-{n}", "sleep": 0}) for n in range(3)
        ]
        try:
            views = await submit_all(store, tasks)
            await store.cancel(views[3].task_id, "")  # C ends before any worker sees it
        finally:
            await aclient.aclose()
        return views

    views = asyncio.run(three())
    (lone,), group = messages(client)
    assert [task["id"] for task in group] == [view.task_id for view in views[1:]]
    a, b, c = (view.task_id for view in views[1:])
    raw_group = client.lrange(QUEUE, 0, 0)[0]  # the newest message: the group of three

    worker = CeleryWorker(stack.env, "w1", stack_factory.log_root / "w1.log", concurrency=4)
    stack.workers.append(worker)
    worker.start()
    first = wait_terminal(client, [lone["id"], a, b, c], timeout=60)
    assert [first[t]["status"] for t in (a, b, c)] == ["succeeded", "succeeded", "canceled"]
    # B's worker "died" before storing its outcome: its record is running again, and the
    # broker hands the message out a second time.
    client.hset(task_key(b), mapping={"status": "running"})
    client.hdel(task_key(b), "result", "finished_at")
    client.lpush(QUEUE, raw_group)
    again = wait_terminal(client, [b], timeout=60)
    acked = lambda: client.llen(QUEUE) == 0 and not client.hlen(KOMBU_UNACKED_KEY)  # noqa: E731
    wait_until(acked, 30, "the copy acked")
    calls = model_calls(counting_log, run)
    assert calls == {f"{run}-0": 1, f"{run}-1": 2}, calls  # A once, B twice, C never
    assert again[b]["status"] == "succeeded"
    assert again[b]["deliveries"] == "2"
    final = records(client, [a, c])
    assert final[a]["deliveries"] == "1"  # START skipped the copy: no second delivery counted
    assert final[c]["status"] == "canceled"


def test_a_big_result_is_published_as_its_id_and_the_waiter_reads_it(
    stack_factory: StackFactory,
) -> None:
    """Every API process receives every publish: a big answer goes out as the id alone."""
    stack = stack_factory.start(workers=1, webhook_consumers=0)
    client = stack_factory.redis_server.client()
    listener = client.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(FINISHED_CHANNEL)
    wait_until(lambda: client.pubsub_numsub(FINISHED_CHANNEL)[0][1] >= 2, 10, "subscribed")
    big = "x" * (PUBLISH_INLINE_BYTES + 1)
    with httpx.Client(base_url=stack.api_url, timeout=60) as http:
        small_answer = http.post("/dispatch_model", json={"model_name": "echo", "input": "hi"})
        big_answer = http.post("/dispatch_model", json={"model_name": "echo", "input": big})
    assert small_answer.status_code == big_answer.status_code == 200, big_answer.text
    assert big_answer.json()["prediction_value"] == big
    published = {}
    deadline = time.monotonic() + 10
    while len(published) < 2 and time.monotonic() < deadline:
        # None also for the subscribe confirmation (ignored): read on until the deadline.
        message = listener.get_message(timeout=1)
        if message is not None:
            task_id, *record = json.loads(message["data"])
            published[task_id] = record
    listener.close()
    assert published[small_answer.json()["task_id"]] != []  # the whole record
    assert published[big_answer.json()["task_id"]] == []  # the id alone
