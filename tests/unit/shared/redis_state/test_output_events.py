"""task.output events against a bare redis-server: written by stream_append in the step that
appends the chunk, coalesced while one waits, paced 0.5 s after the previous one was read,
their outputs read from the stream at their first claim (the same on every retry, never in two
events), bounded per event, the rest of the stream and its end sent after the task ended, and
no more after a receiver's 410."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from shared.redis_state.keys import DUE_KEY, event_key, output_key, stream_key
from shared.redis_state.outbox_scripts import ClaimEvent, PromoteEvents, RecordOutcome
from shared.redis_state.record import Outcome
from shared.redis_state.stream_scripts import AppendOutcome, AppendToStream, StreamLimits
from shared.redis_state.streams import StreamKind
from shared.webhook_output import PACING, OutputPacing
from tests.unit.shared.redis_state.make import TTL, RunAsync, finish, start, submit, submit_task

HOOK = "https://example.com/hook"
LIMITS = StreamLimits(max_entries=100, max_bytes=10_000, ttl=TTL)
TASK = "t-1"


def first(n: int) -> str:
    return f"msg_t1_output_{n}"


def streamed(r: redis.Redis, run_async: RunAsync, events: tuple[str, ...]) -> None:
    submit(run_async, submit_task(TASK, stream=True, webhook=HOOK, events=events))
    start(r, TASK)


def append(run_async: RunAsync, data: str, *, now: float, attempt: int = 1) -> AppendOutcome:
    async def call(client):  # type: ignore[no-untyped-def]
        appended = await AppendToStream(client)(
            TASK, StreamKind.output, data, attempt=attempt, limits=LIMITS, now=now
        )
        return appended.outcome

    outcome: AppendOutcome = run_async(call)
    return outcome


def send(
    r: redis.Redis, event_id: str, *, now: float, pacing: OutputPacing = PACING
) -> dict[str, str]:
    """Promote (due by `now`) and claim `event_id` as a consumer would."""
    promoted = dict(PromoteEvents(r)(now=now, lease=300, limit=100))
    return ClaimEvent(r)(event_id, promoted[event_id], now=now, lease=30, pacing=pacing)


def outputs(event: dict[str, str]) -> list[Any]:
    return [data for _, kind, _, data in json.loads(event["outputs"]) if kind == "output"]


def stream_ids(r: redis.Redis) -> list[str]:
    return [entry_id for entry_id, _ in r.xrange(stream_key(TASK))]  # type: ignore[union-attr]


def due_outputs(r: redis.Redis) -> dict[str, float]:
    return {
        member: score
        for member, score in r.zrange(DUE_KEY, 0, -1, withscores=True)  # type: ignore[union-attr]
        if "_output_" in member
    }


def test_the_first_chunk_writes_one_event_and_the_next_ones_go_into_it(
    r: redis.Redis, run_async: RunAsync
) -> None:
    streamed(r, run_async, ("task.output", "task.succeeded"))
    now = time.time()
    for index in range(3):
        assert append(run_async, f'"c{index}"', now=now + index * 0.01) is AppendOutcome.appended
    assert due_outputs(r) == {first(1): pytest.approx(now)}
    event = r.hgetall(event_key(first(1)))
    assert (event["task_id"], event["type"], event["url"], event["seq"]) == (
        TASK, "task.output", HOOK, "1",
    )  # fmt: skip
    assert (event["state"], event["attempts"], event["ticket"]) == ("pending", "0", "0")
    assert "outputs" not in event  # read when it is sent
    state = r.hgetall(output_key(TASK))
    assert (state["pending"], state["seq"]) == (first(1), "1")
    assert r.ttl(output_key(TASK)) > TTL  # as long as the events (MIN_EVENT_TTL)
    # task.output is not the record's latest event: /deliveries keeps naming its state events.
    assert r.hget("dispatch:task:" + TASK, "webhook_event") is None


def test_no_event_without_the_subscription(r: redis.Redis, run_async: RunAsync) -> None:
    streamed(r, run_async, ("task.succeeded",))
    append(run_async, '"c"', now=time.time())
    assert due_outputs(r) == {}
    assert r.exists(output_key(TASK)) == 0


def test_the_claim_reads_every_chunk_since_the_last_one_and_retries_send_the_same(
    r: redis.Redis, run_async: RunAsync
) -> None:
    streamed(r, run_async, ("task.output",))
    now = time.time()
    for index in range(3):
        append(run_async, json.dumps({"i": index}), now=now)
    claimed = send(r, first(1), now=now + 0.1)
    ids = stream_ids(r)
    assert [json.loads(data) for data in outputs(claimed)] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert [entry[0] for entry in json.loads(claimed["outputs"])] == ids
    assert (claimed["from"], claimed["last_event_id"], claimed["status"], claimed["final"]) == (
        "0-0", ids[-1], "running", "0",
    )  # fmt: skip
    assert float(claimed["at"]) == pytest.approx(now + 0.1)
    state = r.hgetall(output_key(TASK))
    assert (state["upto"], "pending" in state) == (ids[-1], False)
    # A chunk after the read starts the next event, due 0.5 s after the read.
    append(run_async, '"late"', now=now + 0.2)
    assert due_outputs(r)[first(2)] == pytest.approx(now + 0.1 + PACING.interval)
    # The first one fails and is sent again: the same outputs, not the late chunk.
    RecordOutcome(r)(
        first(1), claimed["ticket"], TASK, attempt="{}", state="pending", due=now, log_ttl=60
    )
    again = send(r, first(1), now=now + 0.3)
    assert (again["outputs"], again["attempts"]) == (claimed["outputs"], "2")
    second = send(r, first(2), now=now + 0.7)
    assert outputs(second) == ['"late"']
    assert (second["from"], second["last_event_id"]) == (ids[-1], stream_ids(r)[-1])


def test_a_chunk_long_after_the_last_read_is_due_at_once(
    r: redis.Redis, run_async: RunAsync
) -> None:
    streamed(r, run_async, ("task.output",))
    now = time.time()
    append(run_async, '"a"', now=now)
    send(r, first(1), now=now)
    append(run_async, '"b"', now=now + 3)
    assert due_outputs(r)[first(2)] == pytest.approx(now + 3)


def test_caps_leave_the_rest_to_the_next_event_due_after_the_interval(
    r: redis.Redis, run_async: RunAsync
) -> None:
    streamed(r, run_async, ("task.output",))
    now = time.time()
    for index in range(5):
        append(run_async, f'"{index}"', now=now)
    pacing = OutputPacing(interval=0.5, max_entries=2, max_bytes=1000)
    one = send(r, first(1), now=now, pacing=pacing)
    assert outputs(one) == ['"0"', '"1"']
    assert due_outputs(r)[first(2)] == pytest.approx(now + 0.5)  # written by the claim
    assert r.hget(output_key(TASK), "pending") == first(2)
    append(run_async, '"5"', now=now + 0.1)  # goes into the waiting one
    assert set(due_outputs(r)) == {first(1), first(2)}
    two = send(r, first(2), now=now + 0.5, pacing=pacing)
    three = send(r, first(3), now=now + 1.0, pacing=OutputPacing(max_bytes=6))
    # Bytes: "2" and "3" are 3 bytes each; the third would pass 6. One goes out whatever its size.
    assert (outputs(two), outputs(three)) == (['"2"', '"3"'], ['"4"', '"5"'])
    assert r.hget(output_key(TASK), "pending") is None
    big = OutputPacing(max_bytes=1)
    append(run_async, '"big"', now=now + 2)
    assert outputs(send(r, first(4), now=now + 2, pacing=big)) == ['"big"']


def test_outputs_pending_at_the_end_go_out_after_it_marked_final(
    r: redis.Redis, run_async: RunAsync
) -> None:
    streamed(r, run_async, ("task.output", "task.succeeded"))
    now = time.time()
    append(run_async, '"a"', now=now)
    send(r, first(1), now=now)
    append(run_async, '"b"', now=now + 0.1)
    finish(r, Outcome.succeeded(TASK, "ab"))
    assert append(run_async, '"after"', now=now + 0.2) is AppendOutcome.ended
    assert r.exists(event_key("msg_t1_succeeded")) == 1
    last = send(r, first(2), now=now + 0.6)
    assert (outputs(last), last["status"], last["final"]) == (['"b"'], "succeeded", "1")
    assert last["last_event_id"] == stream_ids(r)[-2]  # the done entry is not an output
    assert set(due_outputs(r)) == {first(1), first(2)}  # nothing follows


def test_a_redelivery_s_restart_mark_is_carried_between_the_attempts(
    r: redis.Redis, run_async: RunAsync
) -> None:
    streamed(r, run_async, ("task.output",))
    now = time.time()
    append(run_async, '"first try"', now=now)
    start(r, TASK)  # its worker died: delivery 2
    append(run_async, '"second try"', now=now, attempt=2)
    read = json.loads(send(r, first(1), now=now)["outputs"])
    assert [(kind, attempt, data) for _, kind, attempt, data in read] == [
        ("output", 1, '"first try"'), ("restart", 2, ""), ("output", 2, '"second try"'),
    ]  # fmt: skip


def test_a_410_stops_the_task_s_later_output_events(r: redis.Redis, run_async: RunAsync) -> None:
    streamed(r, run_async, ("task.output", "task.succeeded"))
    now = time.time()
    append(run_async, '"a"', now=now)
    claimed = send(r, first(1), now=now)
    RecordOutcome(r)(
        first(1), claimed["ticket"], TASK, attempt="{}", state="stopped", due=0, log_ttl=60
    )
    assert r.hget(output_key(TASK), "stopped") == "1"
    append(run_async, '"b"', now=now + 1)
    assert set(due_outputs(r)) == set()
    finish(r, Outcome.succeeded(TASK, "ab"))
    assert r.exists(event_key("msg_t1_succeeded")) == 1  # its other events are sent as before
    # A stop after the task's coalescing state expired leaves no key behind without a TTL.
    r.delete(output_key(TASK))
    r.hset(event_key(first(1)), mapping={"state": "sending", "ticket": "9"})
    RecordOutcome(r)(first(1), "9", TASK, attempt="{}", state="stopped", due=0, log_ttl=60)
    assert r.exists(output_key(TASK)) == 0


def test_a_pending_event_that_expired_is_replaced(r: redis.Redis, run_async: RunAsync) -> None:
    streamed(r, run_async, ("task.output",))
    now = time.time()
    append(run_async, '"a"', now=now)
    r.delete(event_key(first(1)))
    append(run_async, '"b"', now=now)
    assert r.hget(output_key(TASK), "pending") == first(2)
    assert outputs(send(r, first(2), now=now)) == ['"a"', '"b"']
