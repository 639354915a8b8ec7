"""The batch scripts against a bare redis-server: creation in one MULTI, the counters kept by
the items' transitions, the last item ending the batch, cancel, and batch.completed."""

from __future__ import annotations

import json
import time

import redis

from shared.errors import WorkerLost
from shared.priorities import Priority
from shared.redis_state.batch import BatchStatus, decode_batch, item_task_id
from shared.redis_state.batch_scripts import CancelBatchItems, MarkBatchCanceling
from shared.redis_state.keys import DUE_KEY, batch_key, event_key, payload_key, queued_key, task_key
from shared.redis_state.published import parse_published
from shared.redis_state.record import Outcome, decode_record
from tests.unit.shared.redis_state.make import (
    CANCELED,
    TTL,
    Published,
    RunAsync,
    create_batch,
    finish,
    ids,
    item,
    start,
)

HOOK = "https://example.com/hook"


def counts(r: redis.Redis, batch_id: str) -> dict[str, int]:
    view = decode_batch(batch_id, r.hgetall(batch_key(batch_id)))  # type: ignore[arg-type]
    return {k: v for k, v in view.request_counts.model_dump().items() if v}


def mark(run_async: RunAsync, batch_id: str) -> str:
    async def call(client):  # type: ignore[no-untyped-def]
        return await MarkBatchCanceling(client)(batch_id, now=time.time())

    result: str = run_async(call)
    return result


def cancel_items(run_async: RunAsync, batch_id: str, first: int, last: int) -> int:
    async def call(client):  # type: ignore[no-untyped-def]
        async with client.pipeline(transaction=False) as pipe:
            await CancelBatchItems(client)(
                pipe, batch_id, first, last, now=time.time(), ttl=TTL, error=CANCELED
            )
            return (await pipe.execute())[0]

    result: int = run_async(call)
    return result


def test_create_writes_the_batch_its_items_payloads_counters_and_messages(
    r: redis.Redis, run_async: RunAsync
) -> None:
    items = [item("a"), item("b", priority=Priority.batch), item("c", priority=Priority.batch)]
    assert create_batch(run_async, "B", items, payloads={1: b"big"}, ttl=3600) == [1, 1]
    view = decode_batch("B", r.hgetall(batch_key("B")))  # type: ignore[arg-type]
    assert view.status is BatchStatus.in_progress
    assert (view.request_counts.total, view.request_counts.queued) == (3, 3)
    assert 3500 < r.ttl(batch_key("B")) <= 3600
    record = decode_record("B-1", r.hgetall(task_key("B-1")))  # type: ignore[arg-type]
    assert (record.status, record.batch_id, record.custom_id) == ("queued", "B", "b")
    assert record.priority is Priority.batch
    assert r.hget(task_key("B-1"), "owner") == "alice"
    assert 0 < r.ttl(task_key("B-1")) <= TTL
    assert r.get(payload_key("B-1")) == "big"
    assert not r.exists(payload_key("B-0"))
    assert (r.get(queued_key("dispatch")), r.get(queued_key("dispatch.batch"))) == ("1", "2")
    assert r.lrange("dispatch", 0, -1) == ["B-0"]
    assert sorted(r.lrange("dispatch.batch", 0, -1)) == ["B-1", "B-2"]


def test_a_batch_past_the_depth_limit_writes_nothing(r: redis.Redis, run_async: RunAsync) -> None:
    r.set(queued_key("dispatch"), 1)
    assert create_batch(run_async, "B", [item("a"), item("b")], max_depth=2) == [0, 0]
    assert r.keys("*") == [queued_key("dispatch")]
    assert r.get(queued_key("dispatch")) == "1"


def test_idempotency_replays_a_live_batch_and_reuses_the_key_of_an_expired_one(
    r: redis.Redis, run_async: RunAsync
) -> None:
    key = "dispatch:idem:batch:k"
    assert create_batch(run_async, "B1", [item()], idempotency=(key, "fp:B1")) == [1, 1]
    assert create_batch(run_async, "B2", [item()], idempotency=(key, "fp:B2")) == ["fp:B1", 0]
    assert not r.exists(batch_key("B2"), task_key("B2-0"))
    assert r.get(queued_key("dispatch")) == "1"
    r.delete(batch_key("B1"))
    assert create_batch(run_async, "B3", [item()], idempotency=(key, "fp:B3")) == [1, 1]
    assert r.get(key) == "fp:B3"


def test_items_move_the_counters_and_the_last_one_ends_the_batch(
    r: redis.Redis, run_async: RunAsync, published: Published
) -> None:
    create_batch(run_async, "B", [item("a"), item("b")], ttl=3600)
    start(r, "B-0", "B-1")
    assert counts(r, "B") == {"total": 2, "running": 2}
    assert r.get(queued_key("dispatch")) == "0"
    finish(r, Outcome.succeeded("B-0", 1))
    assert counts(r, "B") == {"total": 2, "running": 1, "succeeded": 1}
    assert r.ttl(task_key("B-0")) > TTL  # an ended item is kept as long as its batch
    assert r.hget(batch_key("B"), "status") == "in_progress"
    finish(r, Outcome.succeeded("B-1", 2))
    view = decode_batch("B", r.hgetall(batch_key("B")))  # type: ignore[arg-type]
    assert view.status is BatchStatus.completed
    assert view.finished_at is not None
    assert view.request_counts.succeeded == 2
    assert r.ttl(batch_key("B")) <= TTL  # RESULT_TTL once ended
    # The batch ends within its last item's ending, so it is published first.
    assert ids(published) == ["B-0", "B", "B-1"]
    batch_id, fields = parse_published(published()[1])
    assert batch_id == "B"
    assert fields is not None
    assert fields["status"] == "completed"
    assert not r.exists(DUE_KEY)  # no webhook: no event


def test_batch_completed_is_emitted_like_a_task_event(r: redis.Redis, run_async: RunAsync) -> None:
    create_batch(run_async, "b-1", [item()], webhook=HOOK, events=("batch.completed",))
    start(r, "b-1-0")
    finish(r, Outcome.failed("b-1-0", WorkerLost("lost")))
    event_id = "msg_b1_batch_completed"
    assert r.hget(batch_key("b-1"), "webhook_event") == event_id
    event = r.hgetall(event_key(event_id))
    assert (event["task_id"], event["type"], event["url"]) == ("b-1", "batch.completed", HOOK)
    assert (event["state"], event["attempts"], event["ticket"]) == ("pending", "0", "0")
    snapshot = json.loads(event["record"])
    assert dict(zip(snapshot[::2], snapshot[1::2], strict=True))["status"] == "completed"
    assert r.zscore(DUE_KEY, event_id) is not None


def test_cancel_ends_the_queued_items_and_then_the_batch(
    r: redis.Redis, run_async: RunAsync, published: Published
) -> None:
    create_batch(run_async, "B", [item("a"), item("b"), item("c")], payloads={2: b"p"})
    start(r, "B-0")
    assert mark(run_async, "B") == "in_progress"
    assert r.hget(batch_key("B"), "status") == "canceling"
    assert mark(run_async, "B") == "canceling"
    assert cancel_items(run_async, "B", 0, 2) == 2  # B-0 runs on
    assert counts(r, "B") == {"total": 3, "running": 1, "canceled": 2}
    assert r.get(queued_key("dispatch")) == "0"
    assert not r.exists(payload_key("B-2"))
    error = decode_record("B-2", r.hgetall(task_key("B-2"))).error  # type: ignore[arg-type]
    assert error is not None
    assert error.task_id == "B-2"
    assert r.hget(batch_key("B"), "status") == "canceling"
    finish(r, Outcome.succeeded("B-0", 1))
    assert r.hget(batch_key("B"), "status") == "canceled"
    assert mark(run_async, "B") == "canceled"
    assert mark(run_async, "nothing") == ""
    assert ids(published) == ["B-1", "B-2", "B", "B-0"]


def test_item_task_ids_follow_from_the_batch_id() -> None:
    assert item_task_id("B", 7) == "B-7"
