"""The reconciler on a real redis-server: tasks submitted through the real scripts with real
Celery envelopes, messages lost by deleting them (or held in kombu's unacked hash by a real
kombu channel), rounds run by hand."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from kombu import Connection
from prometheus_client import REGISTRY

from devstack.redis import RedisServer
from shared.celery_app import encode_message, encode_messages
from shared.errors import DeadlineExceeded, TaskExpired
from shared.models import TaskStatus
from shared.priorities import ALL_QUEUES, Priority, queue_of
from shared.redis_state.batch import NewBatch, item_task_id
from shared.redis_state.batch_scripts import AddBatchItems, BatchItemRecord, CreateBatch
from shared.redis_state.keys import (
    OPEN_KEY,
    RECONCILE_LOCK_KEY,
    WORKERS_KEY,
    message_key,
    queued_key,
    task_key,
)
from shared.redis_state.reconcile_scripts import ReconcileTask
from shared.redis_state.record import NewTask, Outcome
from shared.redis_state.task_scripts import (
    FinishTasks,
    StartTasks,
    StartTerms,
    SubmitTask,
    SubmitTasks,
)
from shared.settings import Settings
from worker.reconciler import Reconciler, task_ids

TTL = 600
AGO = 120.0  # tasks are submitted as accepted this long ago: past the bound
EXPIRED = TaskExpired("expired").body().model_dump_json()
OVERRAN = DeadlineExceeded("overran").body().model_dump_json()


@pytest.fixture
def r(bare_redis: RedisServer) -> Iterator[redis.Redis]:
    client = bare_redis.client(decode_responses=True)
    client.flushall()
    yield client
    client.close()


def settings(bare_redis: RedisServer) -> Settings:
    return Settings(
        redis_url=bare_redis.url,
        reconcile_after_seconds=60,
        reconcile_period_seconds=5,
        worker_heartbeat_interval=5,
    )


def reconciler(bare_redis: RedisServer, r: redis.Redis, name: str = "w1@host") -> Reconciler:
    return Reconciler(r, settings(bare_redis), name)


def on_loop(bare_redis: RedisServer, call: Callable[[aioredis.Redis], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        async with aioredis.Redis.from_url(bare_redis.url, decode_responses=True) as client:
            return await call(client)

    return asyncio.run(run())


def new_task(priority: Priority = Priority.default, custom_id: str | None = None) -> NewTask:
    return NewTask(
        model_name="echo",
        model_version=None,
        origin="http://torchserve:8080",
        deadline=time.time() + 300,
        priority=priority,
        custom_id=custom_id,
    )


def entry(task_id: str, priority: Priority = Priority.default) -> dict[str, Any]:
    call = {"origin": "http://torchserve:8080", "model_name": "echo", "model_version": None,
            "body": {"n": task_id}, "deadline": time.time() + 300,
            "submitted_at": time.time() - AGO, "priority": priority.value}  # fmt: skip
    return {"id": task_id, "call": call, "headers": {"request_id": f"req-{task_id}"}}


def submit(bare_redis: RedisServer, *tasks: tuple[str, Priority]) -> dict[str, dict[str, Any]]:
    """One task_submit call as the API's group commit makes it; each task's message entry."""
    entries = {task_id: entry(task_id, priority) for task_id, priority in tasks}
    news = [
        SubmitTask(task_id, queue_of(priority), new_task(priority).fields(time.time() - AGO, "al"))
        for task_id, priority in tasks
    ]
    by_queue: dict[str, list[dict[str, Any]]] = {}
    for task_id, priority in tasks:
        by_queue.setdefault(queue_of(priority), []).append(entries[task_id])
    messages = {queue: encode_message(group, queue=queue) for queue, group in by_queue.items()}
    results = on_loop(
        bare_redis,
        lambda c: SubmitTasks(c)(news, messages, max_depth=100, ttl=TTL, idempotency_ttl=TTL),
    )
    assert results == [1] * len(tasks)
    return entries


def start(bare_redis: RedisServer, worker: str, *task_ids_: str) -> list[tuple[str, int]]:
    terms = StartTerms(3, TTL, worker, EXPIRED, OVERRAN)
    return list(on_loop(bare_redis, lambda c: StartTasks(c)(task_ids_, terms, time.time())))


def finish(bare_redis: RedisServer, *task_ids_: str) -> None:
    outcomes = [Outcome.succeeded(task_id, {"ok": 1}) for task_id in task_ids_]
    on_loop(bare_redis, lambda c: FinishTasks(c)(outcomes, now=time.time(), ttl=TTL))


def lose_every_message(r: redis.Redis) -> None:
    r.delete(*ALL_QUEUES)


def queued_ids(r: redis.Redis, queue: str) -> list[list[str]]:
    return [task_ids(json.loads(raw)) for raw in r.lrange(queue, 0, -1)]


def reconciled_count(priority: str) -> float:
    value = REGISTRY.get_sample_value("dispatcher_tasks_reconciled_total", {"priority": priority})
    return value or 0.0


def test_a_task_whose_message_was_deleted_is_enqueued_again_after_two_rounds(
    bare_redis: RedisServer, r: redis.Redis
) -> None:
    entries = submit(bare_redis, ("a", Priority.default), ("b", Priority.default))
    assert r.zscore(OPEN_KEY, "a") is not None
    lose_every_message(r)
    before = reconciled_count("default")
    rec = reconciler(bare_redis, r)

    first = rec.run_round()
    assert sorted(first.suspects) == ["a", "b"]
    assert first.outcomes == {}
    assert r.llen("dispatch") == 0
    second = rec.run_round()
    assert sorted(second.requeued) == ["a", "b"]
    # One fresh message each, carrying the task's own entry (its call and request headers).
    assert sorted(queued_ids(r, "dispatch")) == [["a"], ["b"]]
    for raw in r.lrange("dispatch", 0, -1):
        envelope = json.loads(raw)
        assert envelope["properties"]["delivery_info"]["routing_key"] == "dispatch"
    record = r.hgetall(task_key("a"))
    assert record["status"] == "queued"
    assert record["reconciled"] == "1"
    assert r.get(queued_key("dispatch")) == "2"  # still the two queued tasks
    assert reconciled_count("default") == before + 2
    assert [t for t in rec.run_round().suspects] == []  # in the queue again
    # The copy of the original message still holds the entry, unchanged.
    copy = json.loads(r.hget(message_key(record["message"]), "body") or "")
    assert set(task_ids(copy)) == {"a", "b"}
    assert entries["a"]["headers"] == {"request_id": "req-a"}
    assert start(bare_redis, "w2@host", "a") == [("run", 1)]


def test_a_task_in_its_queue_or_in_unacked_is_left_alone(
    bare_redis: RedisServer, r: redis.Redis
) -> None:
    submit(bare_redis, ("q", Priority.batch))
    submit(bare_redis, ("u", Priority.interactive))
    # A real kombu channel takes `u`'s message: kombu writes it into its unacked hash.
    with Connection(bare_redis.url) as connection:
        channel = connection.channel()
        message = channel.basic_get("dispatch.interactive", no_ack=False)
        assert message is not None
        assert r.llen("dispatch.interactive") == 0
        assert r.hlen("unacked") == 1
        rec = reconciler(bare_redis, r)
        for _ in range(3):
            found = rec.run_round()
            assert found.candidates == 2
            assert found.suspects == []
            assert found.outcomes == {}
        assert r.llen("dispatch.batch") == 1
        # Acked without its task ending (it was lost in the worker): now it is lost.
        channel.basic_ack(message.delivery_tag)
        assert rec.run_round().suspects == ["u"]
        assert rec.run_round().requeued == ["u"]
        assert queued_ids(r, "dispatch.interactive") == [["u"]]


def test_a_running_task_is_enqueued_again_when_its_worker_died_not_while_it_lives(
    bare_redis: RedisServer, r: redis.Redis
) -> None:
    submit(bare_redis, ("dead", Priority.default), ("live", Priority.default))
    assert start(bare_redis, "dead@host", "dead") == [("run", 1)]
    assert start(bare_redis, "live@host", "live") == [("run", 1)]
    r.zadd(WORKERS_KEY, {"live@host": time.time(), "dead@host": time.time() - 3600})
    lose_every_message(r)  # BRPOPed, never written into unacked
    rec = reconciler(bare_redis, r)
    assert rec.run_round().suspects == ["dead"]
    assert rec.run_round().requeued == ["dead"]
    assert queued_ids(r, "dispatch") == [["dead"]]
    record = r.hgetall(task_key("dead"))
    assert record["status"] == "running"
    assert record["reconciled"] == "1"
    assert r.get(queued_key("dispatch")) == "0"  # a running task is not counted as queued
    # The fresh copy's start counts a second delivery; the live worker's task never moved.
    assert start(bare_redis, "w3@host", "dead") == [("run", 2)]
    assert r.hget(task_key("live"), "reconciled") is None


def test_a_record_that_changed_between_rounds_is_not_enqueued(
    bare_redis: RedisServer, r: redis.Redis
) -> None:
    submit(bare_redis, ("t", Priority.default))
    lose_every_message(r)
    rec = reconciler(bare_redis, r)
    assert rec.run_round().suspects == ["t"]
    # Started between the rounds (the message was in a worker's hands) by a worker since gone.
    assert start(bare_redis, "gone@host", "t") == [("run", 1)]
    second = rec.run_round()
    assert second.suspects == ["t"]
    assert second.outcomes == {}
    assert rec.run_round().requeued == ["t"]


def test_ended_tasks_leave_the_index_and_their_message_copy_goes_with_the_last(
    bare_redis: RedisServer, r: redis.Redis
) -> None:
    submit(bare_redis, ("x", Priority.default), ("y", Priority.default))
    copy = message_key(r.hget(task_key("x"), "message") or "")
    assert r.hget(copy, "open") == "2"
    finish(bare_redis, "x")
    assert r.zscore(OPEN_KEY, "x") is None
    assert r.hget(copy, "open") == "1"
    finish(bare_redis, "y")
    assert r.zcard(OPEN_KEY) == 0
    assert not r.exists(copy)
    # An index entry whose record ended or expired without passing end_task leaves it too.
    r.zadd(OPEN_KEY, {"x": time.time() - AGO, "nobody": time.time() - AGO})
    found = reconciler(bare_redis, r).run_round()
    assert found.candidates == 0
    assert r.zcard(OPEN_KEY) == 0


def test_batch_items_are_indexed_with_their_message_and_enqueued_again(
    bare_redis: RedisServer, r: redis.Redis
) -> None:
    priorities = [Priority.batch, Priority.interactive, Priority.batch, Priority.batch,
                  Priority.interactive]  # fmt: skip
    batch_id = "bat"
    items: list[BatchItemRecord] = []
    calls: dict[str, list[tuple[str, str]]] = {}
    for index, priority in enumerate(priorities):
        task_id, queue = item_task_id(batch_id, index), queue_of(priority)
        fields = new_task(priority, custom_id=f"c{index}").item_fields()
        items.append(BatchItemRecord(index, queue, fields))
        calls.setdefault(queue, []).append((task_id, json.dumps(entry(task_id, priority)["call"])))
    messages = [
        (q, m) for q, c in calls.items() for m in encode_messages(c, queue=q, per_message=2)
    ]
    per_queue = {queue: len(c) for queue, c in calls.items()}
    now = time.time() - AGO

    async def create(client: aioredis.Redis) -> list[Any]:
        async with client.pipeline(transaction=True) as pipe:
            new = NewBatch(len(items), now, "al", TTL, None, ())
            await CreateBatch(client)(pipe, batch_id, fields=new.fields(), per_queue=per_queue,
                                      ttl=TTL, max_depth=100)  # fmt: skip
            await AddBatchItems(client)(pipe, batch_id, items=items, messages=messages, ttl=TTL,
                                        now=now, owner="al")  # fmt: skip
            return list(await pipe.execute())

    assert on_loop(bare_redis, create) == [1, 1]
    for index in range(len(priorities)):
        task_id = item_task_id(batch_id, index)
        copy = json.loads(r.hget(message_key(r.hget(task_key(task_id), "message") or ""), "body"))
        assert task_id in task_ids(copy)
    assert r.zcard(OPEN_KEY) == len(priorities)
    lose_every_message(r)
    rec = reconciler(bare_redis, r)
    rec.run_round()
    assert len(rec.run_round().requeued) == len(priorities)
    assert sorted(queued_ids(r, "dispatch.batch")) == [["bat-0"], ["bat-2"], ["bat-3"]]
    assert sorted(queued_ids(r, "dispatch.interactive")) == [["bat-1"], ["bat-4"]]
    finish(bare_redis, *(item_task_id(batch_id, i) for i in range(len(priorities))))
    assert r.zcard(OPEN_KEY) == 0
    assert not r.keys("dispatch:message:*")


def test_of_two_reconcilers_one_runs_the_round_and_a_push_happens_once(
    bare_redis: RedisServer, r: redis.Redis
) -> None:
    submit(bare_redis, ("t", Priority.default))
    lose_every_message(r)
    clients = [bare_redis.client(decode_responses=True) for _ in range(2)]
    both = [reconciler(bare_redis, c, f"w{n}@host") for n, c in enumerate(clients)]
    barrier = threading.Barrier(2)
    rounds: dict[str, object] = {}

    def tick(rec: Reconciler) -> None:
        barrier.wait()
        rounds[rec.name] = rec.tick()

    threads = [threading.Thread(target=tick, args=(rec,)) for rec in both]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(found is None for found in rounds.values()) == [False, True]
    assert r.pttl(RECONCILE_LOCK_KEY) > 0
    # The suspects are the fleet's: the next round, on the other worker, confirms them.
    r.delete(RECONCILE_LOCK_KEY)
    other = next(rec for rec in both if rounds[rec.name] is None)
    confirmed = other.tick()
    assert confirmed is not None
    assert confirmed.requeued == ["t"]
    # A second push of the same sighting (another round racing this one) changes nothing.
    seen = f"{TaskStatus.queued.value}:0:0"
    again = ReconcileTask(r)("t", seen=seen, live_since=time.time(), message="{}")
    assert again == "changed"
    assert r.llen("dispatch") == 1
    for client in clients:
        client.close()
