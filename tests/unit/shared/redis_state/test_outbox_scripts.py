"""The outbox against a bare redis-server: events written with the task's transition, then
promote, claim, outcome, defer and retry, with stale tickets skipped."""

from __future__ import annotations

import json
import time

import pytest
import redis

from shared.redis_state.keys import DUE_KEY, LOG_LIMIT, MIN_EVENT_TTL, event_key, log_key, task_key
from shared.redis_state.outbox_scripts import (
    ClaimEvent,
    DeferEvent,
    PromoteEvents,
    RecordOutcome,
    RetryEvent,
)
from shared.redis_state.record import Outcome
from tests.unit.shared.redis_state.make import RunAsync, finish, start, submit, submit_task

HOOK = "https://example.com/hook"
STARTED, SUCCEEDED = "msg_t1_started", "msg_t1_succeeded"


def emitted(r: redis.Redis, run_async: RunAsync, *events: str) -> None:
    """Task `t-1` with a webhook for `events`, started and succeeded."""
    submit(run_async, submit_task("t-1", webhook=HOOK, events=events))
    start(r, "t-1")
    finish(r, Outcome.succeeded("t-1", 42))


def retry(run_async: RunAsync, event_id: str, now: float) -> bool:
    async def call(client):  # type: ignore[no-untyped-def]
        return await RetryEvent(client)(event_id, now=now)

    result: bool = run_async(call)
    return result


def test_a_transition_writes_its_subscribed_event_atomically(
    r: redis.Redis, run_async: RunAsync
) -> None:
    emitted(r, run_async, "task.succeeded")
    assert not r.exists(event_key(STARTED))  # not subscribed
    event = r.hgetall(event_key(SUCCEEDED))
    assert (event["task_id"], event["type"], event["url"]) == ("t-1", "task.succeeded", HOOK)
    assert (event["state"], event["attempts"], event["round"], event["ticket"]) == (
        "pending", "0", "0", "0",
    )  # fmt: skip
    snapshot = json.loads(event["record"])
    record = dict(zip(snapshot[::2], snapshot[1::2], strict=True))
    assert (record["status"], record["webhook_event"]) == ("succeeded", SUCCEEDED)
    assert r.hget(task_key("t-1"), "webhook_event") == SUCCEEDED
    assert MIN_EVENT_TTL - 10 < r.ttl(event_key(SUCCEEDED)) <= MIN_EVENT_TTL
    assert r.zscore(DUE_KEY, SUCCEEDED) == pytest.approx(float(event["at"]))


def test_a_redelivered_start_emits_task_started_once(r: redis.Redis, run_async: RunAsync) -> None:
    submit(run_async, submit_task("t-1", webhook=HOOK, events=("task.started",)))
    start(r, "t-1")
    r.hset(event_key(STARTED), "state", "delivered")
    start(r, "t-1")  # a redelivered copy
    assert r.hget(event_key(STARTED), "state") == "delivered"
    assert r.zcard(DUE_KEY) == 1


def test_promote_claim_outcome_delivered(r: redis.Redis, run_async: RunAsync) -> None:
    emitted(r, run_async, "task.succeeded")
    now = time.time()
    assert PromoteEvents(r)(now=now, lease=300, limit=10) == [(SUCCEEDED, "1")]
    assert r.hget(event_key(SUCCEEDED), "state") == "queued"
    assert r.zscore(DUE_KEY, SUCCEEDED) == pytest.approx(now + 300)
    # Promoted again (its lease ran out) while its message still waits: the same ticket.
    assert PromoteEvents(r)(now=now + 301, lease=300, limit=10) == [(SUCCEEDED, "1")]
    claim = ClaimEvent(r)
    event = claim(SUCCEEDED, "1", now=now, lease=30)
    assert (event["state"], event["attempts"], event["round"], event["ticket"]) == (
        "sending", "1", "1", "2",
    )  # fmt: skip
    assert r.zscore(DUE_KEY, SUCCEEDED) == pytest.approx(now + 30)
    assert claim(SUCCEEDED, "1", now=now, lease=30) == {}  # the duplicate message
    outcome = RecordOutcome(r)
    logged = outcome(
        SUCCEEDED, "2", "t-1", attempt='{"n": 1}', state="delivered", due=0, log_ttl=1000
    )
    assert logged is True
    assert r.hget(event_key(SUCCEEDED), "state") == "delivered"
    assert r.zscore(DUE_KEY, SUCCEEDED) is None
    assert r.lrange(log_key("t-1"), 0, -1) == ['{"n": 1}']
    assert 0 < r.ttl(log_key("t-1")) <= 1000


def test_a_failed_attempt_is_due_again_and_a_superseded_claim_decides_nothing(
    r: redis.Redis, run_async: RunAsync
) -> None:
    emitted(r, run_async, "task.succeeded")
    now = time.time()
    PromoteEvents(r)(now=now, lease=300, limit=10)
    ClaimEvent(r)(SUCCEEDED, "1", now=now, lease=30)
    outcome = RecordOutcome(r)
    assert outcome(SUCCEEDED, "2", "t-1", attempt="a1", state="pending", due=now + 60, log_ttl=99)
    assert r.hget(event_key(SUCCEEDED), "state") == "pending"
    assert r.zscore(DUE_KEY, SUCCEEDED) == pytest.approx(now + 60)
    # A consumer that outlived its lease: its attempt is logged, the schedule is not touched.
    stale = outcome(SUCCEEDED, "2", "t-1", attempt="a2", state="failed", due=0, log_ttl=99)
    assert stale is False
    assert r.hget(event_key(SUCCEEDED), "state") == "pending"
    assert r.lrange(log_key("t-1"), 0, -1) == ["a1", "a2"]


def test_the_log_keeps_the_newest_entries(r: redis.Redis) -> None:
    outcome = RecordOutcome(r)
    for n in range(LOG_LIMIT + 5):
        outcome("gone", "1", "t", attempt=str(n), state="failed", due=0, log_ttl=99)
    logged = r.lrange(log_key("t"), 0, -1)
    assert (len(logged), logged[0], logged[-1]) == (LOG_LIMIT, "5", str(LOG_LIMIT + 4))


def test_defer_gives_a_queued_event_back_uncounted(r: redis.Redis, run_async: RunAsync) -> None:
    emitted(r, run_async, "task.succeeded")
    now = time.time()
    PromoteEvents(r)(now=now, lease=300, limit=10)
    defer = DeferEvent(r)
    assert defer(SUCCEEDED, "0", due=now + 1) is False  # stale ticket
    assert defer(SUCCEEDED, "1", due=now + 1) is True
    event = r.hgetall(event_key(SUCCEEDED))
    assert (event["state"], event["attempts"]) == ("pending", "0")
    assert r.zscore(DUE_KEY, SUCCEEDED) == pytest.approx(now + 1)
    assert defer(SUCCEEDED, "1", due=now + 1) is False  # no longer queued
    assert PromoteEvents(r)(now=now + 2, lease=300, limit=10) == [(SUCCEEDED, "2")]


def test_retry_sends_again_with_a_fresh_budget(r: redis.Redis, run_async: RunAsync) -> None:
    emitted(r, run_async, "task.succeeded")
    now = time.time()
    PromoteEvents(r)(now=now, lease=300, limit=10)
    ClaimEvent(r)(SUCCEEDED, "1", now=now, lease=30)
    r.hset(event_key(SUCCEEDED), "state", "failed")
    assert retry(run_async, SUCCEEDED, now + 5) is True
    event = r.hgetall(event_key(SUCCEEDED))
    assert (event["state"], event["round"], event["ticket"], event["attempts"]) == (
        "pending", "0", "3", "1",
    )  # fmt: skip
    assert r.zscore(DUE_KEY, SUCCEEDED) == pytest.approx(now + 5)
    # The send that was in flight no longer decides the schedule.
    assert not RecordOutcome(r)(SUCCEEDED, "2", "t-1", attempt="x", state="failed", due=0,
                                log_ttl=9)  # fmt: skip
    assert retry(run_async, "msg_none", now) is False


def test_promote_drops_expired_events_and_respects_its_limit(r: redis.Redis) -> None:
    now = time.time()
    r.zadd(DUE_KEY, {"gone": now - 1, "later": now + 100})
    for n in range(3):
        r.hset(event_key(f"e{n}"), mapping={"state": "pending", "ticket": 0})
        r.zadd(DUE_KEY, {f"e{n}": now - 10 + n})
    assert PromoteEvents(r)(now=now, lease=60, limit=2) == [("e0", "1"), ("e1", "1")]
    assert PromoteEvents(r)(now=now, lease=60, limit=10) == [("e2", "1")]
    assert r.zscore(DUE_KEY, "gone") is None
    assert r.zscore(DUE_KEY, "later") == pytest.approx(now + 100)
