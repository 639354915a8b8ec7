"""A task's stream against a bare redis-server: order, exact resume after an id, the caps
refused atomically, its TTL, restart marks between attempts, and the end of a stream."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aioredis

from shared.redis_state.keys import stream_key
from shared.redis_state.stream_scripts import (
    Appended,
    AppendOutcome,
    AppendToStream,
    StreamLimits,
)
from shared.redis_state.streams import (
    START,
    StreamEvent,
    StreamKind,
    id_order,
    parse_event_id,
    read_after,
)
from tests.unit.shared.redis_state.make import RunAsync

LIMITS = StreamLimits(max_entries=50, max_bytes=1_000, ttl=600)
OUTPUT, RESTART = StreamKind.output, StreamKind.restart
ERROR, DONE = StreamKind.error, StreamKind.done


@pytest.fixture(autouse=True)
def empty(r: redis.Redis) -> None:
    """Every test starts on an empty database (`r` flushes it)."""


def append(
    run_async: RunAsync,
    kind: StreamKind,
    data: str = "",
    *,
    attempt: int = 1,
    task_id: str = "t1",
    limits: StreamLimits = LIMITS,
) -> Appended:
    async def call(client: aioredis.Redis) -> Appended:
        return await AppendToStream(client)(task_id, kind, data, attempt=attempt, limits=limits)

    result: Appended = run_async(call)
    return result


def read(
    run_async: RunAsync, last_id: str | None = None, *, count: int = 1_000, task_id: str = "t1"
) -> list[StreamEvent]:
    async def call(client: aioredis.Redis) -> list[StreamEvent]:
        return await read_after(client, task_id, last_id, count=count)

    result: list[StreamEvent] = run_async(call)
    return result


def outputs(events: list[StreamEvent]) -> list[str]:
    return [event.data for event in events if event.kind is OUTPUT]


def test_chunks_are_read_back_in_order_with_their_ids(run_async: RunAsync) -> None:
    written = [append(run_async, OUTPUT, f"chunk {n}") for n in range(20)]
    assert {w.outcome for w in written} == {AppendOutcome.appended}
    ids = [w.ids[0] for w in written]
    assert all(len(w.ids) == 1 for w in written)
    assert sorted(ids, key=id_order) == ids
    assert len(set(ids)) == 20
    events = read(run_async)
    assert [e.id for e in events] == ids
    assert outputs(events) == [f"chunk {n}" for n in range(20)]
    assert {(e.kind, e.attempt) for e in events} == {(OUTPUT, 1)}


def test_resume_after_every_id_gives_exactly_the_rest(run_async: RunAsync) -> None:
    for n in range(30):
        append(run_async, OUTPUT, str(n))
    append(run_async, DONE, '{"status": "succeeded"}')
    events = read(run_async)
    assert read(run_async, START) == events  # START is before every entry
    for position, event in enumerate(events):
        assert read(run_async, event.id) == events[position + 1 :]
    assert read(run_async, events[-1].id) == []


def test_paging_from_the_last_id_sees_each_event_once(run_async: RunAsync) -> None:
    for n in range(25):
        append(run_async, OUTPUT, str(n))
    seen: list[StreamEvent] = []
    last: str | None = None
    while page := read(run_async, last, count=7):
        seen += page
        last = page[-1].id
    assert outputs(seen) == [str(n) for n in range(25)]
    assert len({e.id for e in seen}) == 25


def test_the_entry_cap_refuses_the_next_output_and_writes_nothing(
    r: redis.Redis, run_async: RunAsync
) -> None:
    limits = StreamLimits(max_entries=3, max_bytes=1_000, ttl=600)
    for n in range(3):
        assert append(run_async, OUTPUT, str(n), limits=limits).outcome is AppendOutcome.appended
    refused = append(run_async, OUTPUT, "3", limits=limits)
    assert refused == Appended(AppendOutcome.too_many_entries)
    assert r.xlen(stream_key("t1")) == 3
    message = limits.refusal(refused.outcome)
    assert message is not None
    assert "STREAM_MAX_ENTRIES (3" in message
    # The task can still end its stream with its error, which is what readers get last.
    assert append(run_async, ERROR, '{"code": "stream_too_long"}', limits=limits).ids
    assert [e.kind for e in read(run_async)] == [OUTPUT, OUTPUT, OUTPUT, ERROR]


def test_the_byte_cap_counts_bytes_not_characters_and_refuses_atomically(
    r: redis.Redis, run_async: RunAsync
) -> None:
    limits = StreamLimits(max_entries=100, max_bytes=10, ttl=600)
    assert append(run_async, OUTPUT, "é" * 4, limits=limits).outcome is AppendOutcome.appended
    assert append(run_async, OUTPUT, "ab", limits=limits).outcome is AppendOutcome.appended
    # 8 + 2 bytes so far: 10 is the cap, so one more byte is refused and nothing is written.
    before = r.xrange(stream_key("t1"))
    assert append(run_async, OUTPUT, "x", limits=limits).outcome is AppendOutcome.too_many_bytes
    assert r.xrange(stream_key("t1")) == before
    assert append(run_async, OUTPUT, "", limits=limits).outcome is AppendOutcome.appended
    message = limits.refusal(AppendOutcome.too_many_bytes)
    assert message is not None
    assert "STREAM_MAX_BYTES (10 bytes" in message
    assert limits.refusal(AppendOutcome.appended) is None


def test_a_chunk_larger_than_the_cap_is_refused_on_an_empty_stream(
    r: redis.Redis, run_async: RunAsync
) -> None:
    limits = StreamLimits(max_entries=100, max_bytes=10, ttl=600)
    refused = append(run_async, OUTPUT, "x" * 11, limits=limits)
    assert refused.outcome is AppendOutcome.too_many_bytes
    assert not r.exists(stream_key("t1"))


def test_every_append_sets_the_ttl_again_and_the_ending_too(
    r: redis.Redis, run_async: RunAsync
) -> None:
    append(run_async, OUTPUT, "a", limits=StreamLimits(50, 1_000, ttl=100))
    assert 90 < r.ttl(stream_key("t1")) <= 100
    r.expire(stream_key("t1"), 5)
    append(run_async, OUTPUT, "b", limits=StreamLimits(50, 1_000, ttl=200))
    assert 190 < r.ttl(stream_key("t1")) <= 200
    r.expire(stream_key("t1"), 5)
    append(run_async, DONE, "{}", limits=StreamLimits(50, 1_000, ttl=300))
    assert 290 < r.ttl(stream_key("t1")) <= 300
    # A refused append writes nothing, its TTL included.
    r.expire(stream_key("t1"), 5)
    assert append(run_async, OUTPUT, "late").outcome is AppendOutcome.ended
    assert r.ttl(stream_key("t1")) <= 5


def test_nothing_is_appended_after_done_or_error(run_async: RunAsync) -> None:
    append(run_async, OUTPUT, "a")
    append(run_async, DONE, "{}")
    for kind in (OUTPUT, ERROR, DONE, RESTART):
        assert append(run_async, kind, "x", attempt=2).outcome is AppendOutcome.ended
    append(run_async, ERROR, '{"code": "x"}', task_id="t2")
    assert append(run_async, OUTPUT, "a", task_id="t2").outcome is AppendOutcome.ended
    assert [e.kind for e in read(run_async)] == [OUTPUT, DONE]
    assert [e.kind for e in read(run_async, task_id="t2")] == [ERROR]


def test_a_new_attempt_is_marked_and_the_dead_attempts_writer_is_refused(
    run_async: RunAsync,
) -> None:
    append(run_async, OUTPUT, "a1")
    append(run_async, OUTPUT, "b1")
    mark = append(run_async, RESTART, '{"reason": "worker_lost"}', attempt=2)
    assert mark.outcome is AppendOutcome.appended
    assert len(mark.ids) == 1
    assert append(run_async, RESTART, "", attempt=2).outcome is AppendOutcome.stale
    assert append(run_async, OUTPUT, "c1", attempt=1).outcome is AppendOutcome.stale
    append(run_async, OUTPUT, "a2", attempt=2)
    append(run_async, DONE, "{}", attempt=2)
    events = read(run_async)
    assert [(e.kind, e.attempt, e.data) for e in events] == [
        (OUTPUT, 1, "a1"), (OUTPUT, 1, "b1"), (RESTART, 2, '{"reason": "worker_lost"}'),
        (OUTPUT, 2, "a2"), (DONE, 2, "{}"),
    ]  # fmt: skip


def test_a_newer_attempts_output_writes_the_restart_mark_first(run_async: RunAsync) -> None:
    append(run_async, OUTPUT, "a1")
    written = append(run_async, OUTPUT, "a2", attempt=3)
    assert written.outcome is AppendOutcome.appended
    assert len(written.ids) == 2
    events = read(run_async)
    assert [(e.kind, e.attempt, e.data) for e in events] == [
        (OUTPUT, 1, "a1"), (RESTART, 3, ""), (OUTPUT, 3, "a2"),
    ]  # fmt: skip
    assert [e.id for e in events[1:]] == list(written.ids)
    # A first attempt that died before any output leaves nothing to separate: no mark.
    assert len(append(run_async, OUTPUT, "x", attempt=2, task_id="t2").ids) == 1


def test_the_caps_count_per_attempt(r: redis.Redis, run_async: RunAsync) -> None:
    limits = StreamLimits(max_entries=2, max_bytes=6, ttl=600)
    append(run_async, OUTPUT, "abc", limits=limits)
    append(run_async, OUTPUT, "def", limits=limits)
    assert append(run_async, OUTPUT, "g", limits=limits).outcome is AppendOutcome.too_many_entries
    # The redelivered attempt streams in full again; a refused first output writes no mark.
    refused = append(run_async, OUTPUT, "x" * 7, attempt=2, limits=limits)
    assert refused.outcome is AppendOutcome.too_many_bytes
    assert r.xlen(stream_key("t1")) == 2
    assert len(append(run_async, OUTPUT, "abc", attempt=2, limits=limits).ids) == 2
    assert append(run_async, OUTPUT, "def", attempt=2, limits=limits).ids
    assert append(run_async, OUTPUT, "g", attempt=2, limits=limits).outcome.over_cap


def test_concurrent_appends_never_pass_the_cap(r: redis.Redis, run_async: RunAsync) -> None:
    limits = StreamLimits(max_entries=1_000, max_bytes=100, ttl=600)

    async def race(client: aioredis.Redis) -> list[Appended]:
        script = AppendToStream(client)
        return await asyncio.gather(
            *(script("t1", OUTPUT, "0123456789", attempt=1, limits=limits) for _ in range(40))
        )

    results: list[Appended] = run_async(race)
    assert sum(res.outcome is AppendOutcome.appended for res in results) == 10
    assert sum(res.outcome is AppendOutcome.too_many_bytes for res in results) == 30
    assert sum(len(e.data) for e in read(run_async)) == 100 == 10 * 10
    assert r.xlen(stream_key("t1")) == 10


def test_a_clients_event_id_is_checked_before_it_reaches_redis(run_async: RunAsync) -> None:
    assert parse_event_id(" 1700000000000-3 ") == "1700000000000-3"
    assert parse_event_id("0001-02") == "1-2"
    for bad in ("", "12", "1-2-3", "(1-2", "-", "+", "1-x", "1-2\r\nFLUSHALL", f"{2**64}-0"):
        with pytest.raises(ValueError, match="Last-Event-ID") as raised:
            parse_event_id(bad)
        assert len(bad) < 4 or bad not in str(raised.value)  # the value is not echoed
    with pytest.raises(ValueError, match="Last-Event-ID"):
        read(run_async, "nope")
    with pytest.raises(ValueError, match="attempt"):
        append(run_async, OUTPUT, "a", attempt=0)
