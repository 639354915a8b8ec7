"""worker/stream_writer.py against a real redis-server: each output appended as JSON text in
order, the delivery count as the attempt (restart marks between deliveries), a cap refusal
that stops the writer for good with a clear error (the chunks before it kept, the error event
still written), an ended or newer stream that stops the call, and a streamed call through the
caller writing its chunks as they arrive."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis

from devstack import RedisServer
from shared.errors import StreamBroken
from shared.redis_state.stream_scripts import AppendOutcome, AppendToStream, StreamLimits
from shared.redis_state.streams import StreamEvent, StreamKind, read_after
from tests.unit.worker.backends import calls
from tests.unit.worker.backends.test_stream_call import CHAT, TOKENS, replying, sse, streamed
from worker.stream_writer import StreamWriter

T = TypeVar("T")
LIMITS = StreamLimits(max_entries=5, max_bytes=200, ttl=600)
OUTPUT, RESTART, ERROR, DONE = (StreamKind.output, StreamKind.restart, StreamKind.error,
                                StreamKind.done)  # fmt: skip


OnRedis = Callable[[Callable[[aioredis.Redis], Awaitable[Any]]], Any]


@pytest.fixture
def on_redis(redis_server: RedisServer) -> OnRedis:
    """Runs `scenario(client)` on an emptied database of the session's redis-server."""
    sync = redis_server.client()
    sync.flushall()
    sync.close()

    def run(scenario: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        async def main() -> T:
            client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
            try:
                return await scenario(client)
            finally:
                await client.aclose()

        return asyncio.run(main())

    return run


def writer(client: aioredis.Redis, attempt: int = 1, limits: StreamLimits = LIMITS) -> StreamWriter:
    return StreamWriter(AppendToStream(client), "t1", attempt, limits)


async def events(client: aioredis.Redis) -> list[StreamEvent]:
    return await read_after(client, "t1", None, count=1_000)


def test_outputs_are_appended_in_order_as_json_text(on_redis: OnRedis) -> None:
    values: list[Any] = [{"token": "Hé"}, "plain text", [1, 2.5], "data:image/png;base64,AAAA"]

    async def scenario(client: aioredis.Redis) -> list[StreamEvent]:
        write = writer(client)
        await write.begin()  # a first delivery: no restart mark
        for value in values:
            await write.output(value)
        assert write.sent == 4
        return await events(client)

    written = on_redis(scenario)
    assert [(e.kind, e.attempt) for e in written] == [(OUTPUT, 1)] * 4
    assert [json.loads(e.data) for e in written] == values
    assert written[0].data == '{"token":"Hé"}'  # compact, UTF-8 rather than escapes


def test_a_redelivery_starts_with_a_restart_mark_then_its_own_output(on_redis: OnRedis) -> None:
    async def scenario(client: aioredis.Redis) -> list[StreamEvent]:
        first = writer(client, attempt=1)
        await first.output("old")
        second = writer(client, attempt=2)
        await second.begin()
        await second.output("new")
        with pytest.raises(StreamBroken) as caught:  # the dead delivery, if it woke up
            await first.output("late")
        assert "a newer delivery of the task writes its stream" in caught.value.msg
        return await events(client)

    written = on_redis(scenario)
    assert [(e.kind, e.attempt) for e in written] == [(OUTPUT, 1), (RESTART, 2), (OUTPUT, 2)]
    assert json.loads(written[1].data) == {"attempt": 2}
    assert json.loads(written[2].data) == "new"


@pytest.mark.parametrize(
    ("limits", "setting"),
    [
        (StreamLimits(max_entries=2, max_bytes=10_000, ttl=600), "STREAM_MAX_ENTRIES (2 chunks"),
        (StreamLimits(max_entries=50, max_bytes=20, ttl=600), "STREAM_MAX_BYTES (20 bytes"),
    ],
)
def test_a_cap_stops_the_writer_for_good_and_the_error_still_ends_the_stream(
    on_redis: OnRedis, limits: StreamLimits, setting: str
) -> None:
    async def scenario(client: aioredis.Redis) -> list[StreamEvent]:
        write = writer(client, limits=limits)
        await write.output("12345")  # 7 bytes as JSON
        await write.output("12345")
        with pytest.raises(StreamBroken) as caught:
            await write.output("12345")
        assert setting in caught.value.msg
        assert "12345" not in caught.value.msg  # the data never is in a message
        with pytest.raises(StreamBroken) as again:  # smaller, it would fit: still refused
            await write.output("")
        assert again.value is caught.value
        # The ending (lib.lua end_stream's, here appended as it would be) is not capped.
        body = caught.value.body("t1").model_dump_json()
        ended = await AppendToStream(client)("t1", ERROR, body, attempt=1, limits=limits)
        assert ended.outcome is AppendOutcome.appended
        return await events(client)

    written = on_redis(scenario)
    assert [e.kind for e in written] == [OUTPUT, OUTPUT, ERROR]
    body = json.loads(written[-1].data)
    assert (body["code"], body["task_id"]) == ("stream_broken", "t1")


def test_an_ended_stream_stops_the_call(on_redis: OnRedis) -> None:
    async def scenario(client: aioredis.Redis) -> list[StreamEvent]:
        write = writer(client)
        await write.output("a")
        done = await AppendToStream(client)("t1", DONE, "", attempt=1, limits=LIMITS)
        assert done.outcome is AppendOutcome.appended
        with pytest.raises(StreamBroken) as caught:
            await write.output("b")
        assert "had already ended" in caught.value.msg
        return await events(client)

    assert [e.kind for e in on_redis(scenario)] == [OUTPUT, DONE]


def test_a_chunk_that_is_not_json_is_refused_without_writing(on_redis: OnRedis) -> None:
    async def scenario(client: aioredis.Redis) -> list[StreamEvent]:
        with pytest.raises(StreamBroken) as caught:
            await writer(client).output({"score": float("nan")})
        assert "NaN or Infinity" in caught.value.msg
        return await events(client)

    assert on_redis(scenario) == []


def test_a_streamed_call_writes_each_chunk_to_the_task_stream(on_redis: OnRedis) -> None:
    async def scenario(client: aioredis.Redis) -> tuple[Any, list[StreamEvent]]:
        write = writer(client, limits=StreamLimits(100, 100_000, 600))
        reply = streamed(*(sse(c) for c in CHAT), sse("[DONE]"))
        caller, _, _ = calls.make_caller(replying(_NoSink(), reply))
        call = calls.call("llm", "chat.completions", body={"messages": []}, stream=True)
        answer = await caller.predict_answer(call, None, write)
        return answer, await events(client)

    answer, written = on_redis(scenario)
    assert [json.loads(e.data) for e in written] == CHAT
    assert answer.value["choices"][0]["message"]["content"] == "".join(TOKENS)


def test_a_cap_mid_call_fails_it_unretried_with_the_chunks_before_kept(on_redis: OnRedis) -> None:
    async def scenario(client: aioredis.Redis) -> tuple[Exception, list[StreamEvent], int]:
        write = writer(client, limits=StreamLimits(2, 100_000, 600))
        reply = streamed(*(sse(c) for c in CHAT), sse("[DONE]"))
        caller, upstream, _ = calls.make_caller(replying(_NoSink(), reply, reply))
        call = calls.call("llm", "chat.completions", body={"messages": []}, stream=True)
        with pytest.raises(StreamBroken) as caught:
            await caller.predict_answer(call, None, write)
        return caught.value, await events(client), len(upstream.sent)

    error, written, requests = on_redis(scenario)
    assert "STREAM_MAX_ENTRIES" in str(error)
    assert [json.loads(e.data) for e in written] == CHAT[:2]
    assert requests == 1


class _NoSink:
    """`replying` wants a recorder of the replies it hands out; these tests read Redis."""

    def __init__(self) -> None:
        self.replies: list[Any] = []
