"""The task scripts against a bare redis-server: every transition of a task, its depth counter,
idempotency keys, the claim-checked payload, redeliveries, a cancel race and an expiry."""

from __future__ import annotations

import json
import time

import pytest
import redis

from shared.errors import DeadlineExceeded, TaskCanceled, TaskExpired, WorkerLost
from shared.models import TaskStatus
from shared.priorities import Priority
from shared.redis_state.keys import (
    DELIVERY_LOG_LIMIT,
    LAST_FINISHED_KEY,
    PUBLISH_INLINE_BYTES,
    payload_key,
    queued_key,
    task_key,
)
from shared.redis_state.published import parse_published
from shared.redis_state.record import Outcome, decode_record, idempotency_record
from shared.redis_state.task_scripts import CancelTask, SettleTask
from tests.unit.shared.redis_state.make import (
    CANCELED,
    IDEMPOTENCY_TTL,
    TTL,
    Published,
    RunAsync,
    finish,
    ids,
    start,
    submit,
    submit_task,
)

DEFAULT = "dispatch"


def depth(r: redis.Redis, queue: str = DEFAULT) -> int:
    return int(r.get(queued_key(queue)) or 0)


def status(r: redis.Redis, task_id: str) -> str | None:
    return r.hget(task_key(task_id), "status")  # type: ignore[return-value]


def cancel(run_async: RunAsync, task_id: str) -> str:
    async def call(client):  # type: ignore[no-untyped-def]
        return await CancelTask(client)(task_id, now=time.time(), ttl=TTL, error=CANCELED)

    result: str = run_async(call)
    return result


def settle(run_async: RunAsync, task_id: str, expected: TaskStatus, new: TaskStatus) -> bool:
    error = WorkerLost("lost").body(task_id).model_dump_json()

    async def call(client):  # type: ignore[no-untyped-def]
        return await SettleTask(client)(
            task_id, expected=expected, new=new, now=time.time(), error=error, ttl=TTL
        )

    result: bool = run_async(call)
    return result


def test_submit_records_the_task_its_payload_counter_message_and_idempotency_key(
    r: redis.Redis, run_async: RunAsync
) -> None:
    key = ("dispatch:idem:k1", idempotency_record("fp", "t1"))
    assert submit(run_async, submit_task("t1", payload=b"\x00big", idempotency=key)) == [1]
    view = decode_record("t1", r.hgetall(task_key("t1")))  # type: ignore[arg-type]
    assert (view.status, view.model_name, view.priority) == ("queued", "echo", Priority.default)
    assert r.hget(task_key("t1"), "owner") == "alice"
    assert 0 < r.ttl(task_key("t1")) <= TTL
    assert r.get(payload_key("t1")) == "\x00big"
    assert 0 < r.ttl(payload_key("t1")) <= TTL
    assert r.get("dispatch:idem:k1") == "fp:t1"
    assert 0 < r.ttl("dispatch:idem:k1") <= IDEMPOTENCY_TTL
    assert depth(r) == 1
    assert r.lrange(DEFAULT, 0, -1) == ['["t1"]']


def test_a_full_class_refuses_its_tasks_and_writes_nothing_for_them(
    r: redis.Redis, run_async: RunAsync
) -> None:
    r.set(queued_key(DEFAULT), 2)
    results = submit(
        run_async,
        submit_task("full", payload=b"x"),
        submit_task("ok", priority=Priority.interactive),
        max_depth=2,
    )
    assert results == [0, 1]
    assert not r.exists(task_key("full"), payload_key("full"))
    assert depth(r) == 2
    assert not r.exists(DEFAULT)  # no task of its message was recorded: no message
    assert status(r, "ok") == "queued"
    assert depth(r, "dispatch.interactive") == 1
    assert r.llen("dispatch.interactive") == 1


def test_idempotency_replays_a_live_task_and_reuses_the_key_of_an_ended_one(
    r: redis.Redis, run_async: RunAsync
) -> None:
    key = "dispatch:idem:k2"
    assert submit(run_async, submit_task("a", idempotency=(key, "fp:a"))) == [1]
    # Concurrent first requests: in one call or in another, the later ones find the first.
    results = submit(
        run_async,
        submit_task("b", idempotency=(key, "fp:b")),
        submit_task("c", idempotency=(key, "fp2:c")),
    )
    assert results == ["fp:a", "fp:a"]
    assert not r.exists(task_key("b"), task_key("c"))
    assert depth(r) == 1
    r.delete(task_key("a"))  # its record expired: the key names a task that is gone
    assert submit(run_async, submit_task("d", idempotency=(key, "fp:d"))) == [1]
    assert r.get(key) == "fp:d"


def test_one_call_with_one_key_twice_creates_one_task(r: redis.Redis, run_async: RunAsync) -> None:
    key = "dispatch:idem:k3"
    results = submit(
        run_async,
        submit_task("first", idempotency=(key, "fp:first")),
        submit_task("second", idempotency=(key, "fp:second")),
    )
    assert results == [1, "fp:first"]
    assert not r.exists(task_key("second"))


def test_queued_running_succeeded_counts_the_depth_down_once(
    r: redis.Redis, run_async: RunAsync, published: Published
) -> None:
    submit(run_async, submit_task("t", payload=b"claim"))
    assert start(r, "t") == [("run", 1)]
    record = r.hgetall(task_key("t"))
    assert (record["status"], record["worker"], record["deliveries"]) == ("running", "w1@host", "1")
    assert depth(r) == 0
    assert r.exists(payload_key("t"))  # still needed until the task ends
    # A redelivered copy while it runs: runs again, counted once.
    assert start(r, "t") == [("run", 2)]
    assert depth(r) == 0
    done = Outcome.succeeded("t", "ok text", "text/plain")
    assert finish(r, done) == [True]
    view = decode_record("t", r.hgetall(task_key("t")))  # type: ignore[arg-type]
    assert (view.status, view.prediction_value) == ("succeeded", "ok text")
    assert view.prediction_content_type == "text/plain"
    assert depth(r) == 0
    assert not r.exists(payload_key("t"))
    assert float(r.get(LAST_FINISHED_KEY)) == pytest.approx(time.time(), abs=5)  # type: ignore[arg-type]
    [message] = published()
    task_id, fields = parse_published(message)
    assert task_id == "t"
    assert fields is not None
    assert fields["status"] == "succeeded"


def test_a_finished_task_keeps_its_first_outcome_and_skips_a_redelivered_copy(
    r: redis.Redis, run_async: RunAsync
) -> None:
    submit(run_async, submit_task("t"))
    start(r, "t")
    assert finish(r, Outcome.succeeded("t", {"a": 1})) == [True]
    assert finish(r, Outcome.succeeded("t", {"a": 2})) == [False]
    assert json.loads(r.hget(task_key("t"), "result")) == {"a": 1}  # type: ignore[arg-type]
    assert start(r, "t") == [("succeeded", 0)]
    assert r.hget(task_key("t"), "deliveries") == "1"


def test_failed_outcome_and_missing_and_too_many(r: redis.Redis, run_async: RunAsync) -> None:
    submit(run_async, submit_task("f"), submit_task("many"))
    assert start(r, "f", "gone") == [("run", 1), ("missing", 0)]
    assert finish(r, Outcome.failed("f", WorkerLost("boom"))) == [True]
    view = decode_record("f", r.hgetall(task_key("f")))  # type: ignore[arg-type]
    assert view.status == "failed"
    assert view.error is not None
    assert (view.error.task_id, view.error.code) == ("f", WorkerLost.code)
    assert start(r, "many", max_deliveries=1) == [("run", 1)]
    assert start(r, "many", max_deliveries=1) == [("too_many", 2)]
    assert status(r, "many") == "running"  # the worker fails it with FINISH


def test_a_queued_task_past_its_deadline_expires_at_start(
    r: redis.Redis, run_async: RunAsync, published: Published
) -> None:
    submit(run_async, submit_task("old", deadline_in=-1, payload=b"p"))
    assert start(r, "old") == [("expired", 1)]
    view = decode_record("old", r.hgetall(task_key("old")))  # type: ignore[arg-type]
    assert view.status == "expired"
    assert view.error is not None
    assert (view.error.task_id, view.error.code) == ("old", TaskExpired.code)
    assert depth(r) == 0
    assert not r.exists(payload_key("old"))
    assert ids(published) == ["old"]


def test_a_redelivered_running_task_past_its_deadline_fails_overran(
    r: redis.Redis, run_async: RunAsync
) -> None:
    submit(run_async, submit_task("t", deadline_in=30))
    start(r, "t")
    assert start(r, "t", now=time.time() + 60) == [("expired", 2)]
    view = decode_record("t", r.hgetall(task_key("t")))  # type: ignore[arg-type]
    assert view.status == "failed"
    assert view.error is not None
    assert view.error.code == DeadlineExceeded.code
    assert depth(r) == 0  # counted down at its first start, not again


def test_cancel_of_each_status(r: redis.Redis, run_async: RunAsync, published: Published) -> None:
    submit(run_async, submit_task("q", payload=b"p"), submit_task("run"))
    assert depth(r) == 2
    assert cancel(run_async, "q") == "canceled"
    assert depth(r) == 1
    assert not r.exists(payload_key("q"))
    view = decode_record("q", r.hgetall(task_key("q")))  # type: ignore[arg-type]
    assert view.status == "canceled"
    assert view.finished_at is not None
    assert view.error is not None
    assert view.error.code == TaskCanceled.code
    start(r, "run")
    assert cancel(run_async, "run") == "cancel_requested"
    assert r.hget(task_key("run"), "cancel_requested") == "1"
    assert status(r, "run") == "running"
    assert cancel(run_async, "q") == "canceled"  # the status it has: nothing written
    assert cancel(run_async, "nothing") == "missing"
    assert ids(published) == ["q"]


def test_cancel_races_start_whichever_comes_first_decides(
    r: redis.Redis, run_async: RunAsync
) -> None:
    submit(run_async, submit_task("cancel-first"), submit_task("start-first"))
    assert cancel(run_async, "cancel-first") == "canceled"
    assert start(r, "cancel-first") == [("canceled", 0)]  # never reaches TorchServe
    assert start(r, "start-first") == [("run", 1)]
    assert cancel(run_async, "start-first") == "cancel_requested"
    assert finish(r, Outcome.succeeded("start-first", 1)) == [True]  # it still stores its result
    assert status(r, "start-first") == "succeeded"
    assert depth(r) == 0  # each left `queued` once


def test_settle_ends_an_overdue_task_unless_it_moved_on(
    r: redis.Redis, run_async: RunAsync, published: Published
) -> None:
    submit(run_async, submit_task("q", deadline_in=-1, payload=b"p"), submit_task("r"))
    assert settle(run_async, "q", TaskStatus.queued, TaskStatus.expired) is True
    assert status(r, "q") == "expired"
    assert depth(r) == 1
    assert not r.exists(payload_key("q"))
    assert settle(run_async, "q", TaskStatus.queued, TaskStatus.expired) is False
    start(r, "r")
    assert settle(run_async, "r", TaskStatus.queued, TaskStatus.expired) is False  # moved on
    assert status(r, "r") == "running"
    assert settle(run_async, "r", TaskStatus.running, TaskStatus.failed) is True
    assert status(r, "r") == "failed"
    assert depth(r) == 0
    assert ids(published) == ["q", "r"]


def test_a_big_result_is_published_as_its_id_alone(
    r: redis.Redis, run_async: RunAsync, published: Published
) -> None:
    submit(run_async, submit_task("big"), submit_task("small"))
    start(r, "big", "small")
    finish(
        r,
        Outcome.succeeded("big", "x" * PUBLISH_INLINE_BYTES),
        Outcome.succeeded("small", "x"),
    )
    assert parse_published(published()[0]) == ("big", None)
    small = parse_published(published()[1])
    assert small[0] == "small"
    assert small[1] is not None
    assert small[1]["result"] == '"x"'


def test_ending_sets_the_record_ttl_again(r: redis.Redis, run_async: RunAsync) -> None:
    submit(run_async, submit_task("t"))
    r.expire(task_key("t"), 5)
    start(r, "t")
    finish(r, Outcome.succeeded("t", 1))
    assert r.ttl(task_key("t")) > 5


def test_a_queued_task_ended_by_finish_leaves_the_queue_once(
    r: redis.Redis, run_async: RunAsync
) -> None:
    submit(run_async, submit_task("t", payload=b"p"))
    # A worker gives up a task START never moved (e.g. too many deliveries): it ends from queued.
    assert finish(r, Outcome.failed("t", WorkerLost("lost"))) == [True]
    assert (status(r, "t"), depth(r)) == ("failed", 0)
    assert not r.exists(payload_key("t"))
    assert start(r, "t") == [("failed", 0)]
    assert depth(r) == 0


def test_each_delivery_that_runs_is_logged_up_to_the_limit(
    r: redis.Redis, run_async: RunAsync
) -> None:
    """`starts`: "<now> <worker>" per delivery that ran, the first DELIVERY_LOG_LIMIT only."""
    submit(run_async, submit_task("t"))
    for n in range(DELIVERY_LOG_LIMIT + 2):
        assert start(r, "t", max_deliveries=100, now=1000.0 + n) == [("run", n + 1)]
    lines = r.hget(task_key("t"), "starts").splitlines()  # type: ignore[union-attr]
    assert lines == [f"{1000 + n}.0 w1@host" for n in range(DELIVERY_LOG_LIMIT)]
    assert r.hget(task_key("t"), "started_at") == f"{1000 + DELIVERY_LOG_LIMIT + 1}.0"
