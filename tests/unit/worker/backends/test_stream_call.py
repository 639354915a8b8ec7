"""Streamed calls (worker/backends/stream_call.py through caller.py): the request each protocol
sends for a stream, every output handed to the sink as it arrives and in order, the final answer
the decoder's (what the non-streamed call returns), the errors of a stream that ends wrong, and
the retry rule: retried only while nothing was sent. A fake transport whose replies give their
body piece by piece, and a real socket server for the pool's per-read timeout and chunk ends."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from shared.errors import (
    BackendTimeout,
    DeadlineExceeded,
    ModelRejectedInput,
    StreamBroken,
    UnsupportedOperation,
)
from tests.support.upstream_fakes import Canned, Sent
from tests.unit.worker.backends import calls
from tests.unit.worker.http_server import running
from worker.backends import Caller
from worker.backends.base import Answer, parse_answer
from worker.http_client import Pool, ProtocolError, ReadTimeout

EVENT_STREAM = {"content-type": "text/event-stream"}
TOP = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1754523863, "model": "m"}


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {**TOP, "choices": [choice], **extra}


def sse(value: Any) -> bytes:
    data = value if isinstance(value, str) else json.dumps(value)
    return f"data: {data}\n\n".encode()


TOKENS = ["Hel", "lo", " wör", "ld"]
USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
CHAT = [chunk(t) for t in TOKENS] + [chunk(finish="stop"), {**TOP, "choices": [], "usage": USAGE}]


@dataclass
class Streamed(Canned):
    """A 2xx whose body comes as `script` says: bytes, None (an HTTP/1.1 chunk's end), a float
    (seconds of silence), or an exception (raised by the transport there). `pulled` counts the
    items handed out, so a test sees how far the body was read when each output arrived."""

    script: list[bytes | float | Exception | None] = field(default_factory=list)
    pulled: int = 0

    async def pieces(self) -> Any:
        for item in self.script:
            self.pulled += 1
            if isinstance(item, Exception):
                raise item
            if isinstance(item, float):
                await asyncio.sleep(item)
                continue
            yield item


def streamed(*script: bytes | float | Exception | None, **headers: str) -> Streamed:
    return Streamed(200, b"", {**EVENT_STREAM, **headers}, script=list(script))


# `llm` with a read timeout shorter than a call's deadline: a silence is the backend's, not the
# deadline's.
BACKENDS = {**calls.BACKENDS, "llm": {**calls.BACKENDS["llm"], "read_timeout": 5}}


def make_caller(handler: Any, **overrides: Any) -> tuple[Caller, Any, list[float]]:
    return calls.make_caller(handler, **{"backends": BACKENDS, **overrides})


class Sink:
    """Records each output and how much of `reply`'s body had been read when it came."""

    def __init__(self, refuse_after: int | None = None) -> None:
        self.outputs: list[Any] = []
        self.read_when: list[int] = []
        self.refuse_after = refuse_after
        self.replies: list[Streamed] = []

    async def output(self, value: Any) -> None:
        if self.refuse_after is not None and len(self.outputs) >= self.refuse_after:
            raise StreamBroken("the task's stream reached STREAM_MAX_ENTRIES")
        self.outputs.append(value)
        self.read_when.append(self.replies[-1].pulled if self.replies else -1)


def replying(sink: Sink, *answers: Canned) -> Any:
    """A handler giving `answers` in order, the streamed ones remembered by `sink`."""
    pending = list(answers)

    def handler(_: Sent) -> Canned:
        assert pending, "more requests than scripted answers"
        reply = pending.pop(0)
        if isinstance(reply, Streamed):
            sink.replies.append(reply)
        return reply

    return handler


async def raised(caller: Caller, call: Any, sink: Sink, payload: bytes | None = None) -> Exception:
    """The exception the call raised; the test fails if it succeeded."""
    try:
        await caller.predict_answer(call, payload, sink)
    except Exception as error:
        return error
    raise AssertionError("the call succeeded")


def run(caller: Caller, call: Any, sink: Sink | None) -> Answer:
    return asyncio.run(caller.predict_answer(call, None, sink))


def failure(caller: Caller, call: Any, sink: Sink) -> Exception:
    return asyncio.run(raised(caller, call, sink))


def chat(said: str = "hi", **overrides: object) -> Any:
    body = {"messages": [{"role": "user", "content": said}], "temperature": 0}
    return calls.call("llm", "chat.completions", body=body, stream=True, **overrides)


def test_an_openai_stream_is_asked_for_and_each_chunk_is_sent_on_as_it_arrives() -> None:
    sink = Sink()
    reply = streamed(*(sse(c) for c in CHAT), sse("[DONE]"))
    caller, upstream, _ = make_caller(replying(sink, reply))
    answer = run(caller, chat(), sink)
    body = json.loads(upstream.sent[0].body)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["model"] == "iris"
    assert body["temperature"] == 0
    assert upstream.sent[0].url == f"{calls.OPENAI_ORIGIN}/v1/chat/completions"
    assert sink.outputs == CHAT
    # Each output went to the sink as soon as its event was read, not once the body was.
    assert sink.read_when == [1, 2, 3, 4, 5, 6]
    message = answer.value["choices"][0]
    assert answer.value["object"] == "chat.completion"
    assert message["message"]["content"] == "".join(TOKENS)
    assert message["finish_reason"] == "stop"
    assert answer.value["usage"] == USAGE
    assert reply.closed


def test_a_stream_option_the_request_sent_is_kept_and_a_non_streamed_call_is_unchanged() -> None:
    sink = Sink()
    body = {"prompt": "hi", "stream_options": {"continuous_usage_stats": True}}
    caller, upstream, _ = make_caller(
        replying(sink, streamed(sse(chunk("a", "stop")), sse("[DONE]")),
                 calls.json_answer(200, {"object": "text_completion", "choices": []})),
    )  # fmt: skip
    run(caller, calls.call("llm", "completions", body=body, stream=True), sink)
    sent = json.loads(upstream.sent[0].body)
    assert sent["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    run(caller, calls.call("llm", "completions", body={"prompt": "hi"}), None)
    assert json.loads(upstream.sent[1].body) == {"prompt": "hi", "model": "iris"}


def test_embeddings_do_not_stream_and_nothing_is_sent() -> None:
    caller, upstream, _ = make_caller(calls.no_request)
    call = calls.call("llm", "embeddings", body={"input": "x"}, stream=True)
    error = failure(caller, call, Sink())
    assert isinstance(error, UnsupportedOperation)
    assert upstream.sent == []


@pytest.mark.parametrize("operation", ["infer", "generate"])
def test_oip_streams_go_to_the_stream_endpoints_and_the_last_response_is_the_answer(
    operation: str,
) -> None:
    sink = Sink()
    responses = [{"model_name": "iris", "outputs": [{"name": "o", "data": [n]}]} for n in range(3)]
    caller, upstream, _ = make_caller(replying(sink, streamed(*map(sse, responses))))
    answer = run(caller, calls.call("mls", operation, stream=True), sink)
    assert upstream.sent[0].url == f"{calls.OIP_ORIGIN}/v2/models/iris/{operation}_stream"
    assert json.loads(upstream.sent[0].body) == {"inputs": []}
    assert sink.outputs == responses
    assert answer == Answer(responses[-1])


def test_oip_refuses_to_stream_bytes_before_sending_anything() -> None:
    caller, upstream, _ = make_caller(calls.no_request)
    part = {"name": "image", "size": 3, "content_type": "image/png"}
    call = calls.with_bytes("mls", "infer", part, stream=True)
    error = asyncio.run(raised(caller, call, Sink(), b"png"))
    assert isinstance(error, UnsupportedOperation)
    assert upstream.sent == []


def test_torchserve_chunks_are_outputs_and_the_answer_is_the_non_streamed_one() -> None:
    sink = Sink()
    parts = [b'{"token": "a"}', b'{"token": "b"}', b'{"token": "c"}']
    script: list[bytes | float | Exception | None] = []
    for part in parts:  # each chunk split across two reads, then its end
        script += [part[:5], part[5:], None]
    reply = Streamed(200, b"", {}, script=[*script, None])  # the last, empty chunk's end
    backends = {**BACKENDS, "ts2": {"url": "http://127.0.0.1:9300", "protocol": "torchserve"}}
    caller, upstream, _ = make_caller(replying(sink, reply), backends=backends)
    answer = run(caller, calls.call("ts2", "predictions", body={"x": 1}, stream=True), sink)
    assert upstream.sent[0].url == "http://127.0.0.1:9300/predictions/iris"
    assert json.loads(upstream.sent[0].body) == {"x": 1}  # nothing extra is asked for
    assert sink.outputs == [{"token": "a"}, {"token": "b"}, {"token": "c"}]
    assert sink.read_when == [3, 6, 9]
    assert answer == parse_answer(b"".join(parts), None)


def test_a_reply_that_cannot_stream_is_one_piece_with_the_same_answer() -> None:
    sink = Sink()
    body = sse(chunk("whole", "stop")) + sse("[DONE]")
    caller, _, _ = make_caller(replying(sink, Canned(200, body, EVENT_STREAM)))
    answer = run(caller, chat(), sink)
    assert sink.outputs == [chunk("whole", "stop")]
    assert answer.value["choices"][0]["message"]["content"] == "whole"


def test_a_stream_that_ends_without_done_fails_and_its_chunks_stay_sent() -> None:
    sink = Sink()
    caller, upstream, _ = make_caller(replying(sink, streamed(sse(chunk("He")))))
    error = failure(caller, chat(), sink)
    assert isinstance(error, StreamBroken)
    assert "without [DONE]" in error.msg
    assert sink.outputs == [chunk("He")]
    assert len(upstream.sent) == 1


def test_a_connection_cut_mid_body_is_cut_short_and_not_retried() -> None:
    sink = Sink()
    cut = streamed(sse(chunk("He")), ProtocolError("closed the connection mid-answer"))
    caller, upstream, sleeps = make_caller(replying(sink, cut))
    error = failure(caller, chat(), sink)
    assert isinstance(error, StreamBroken)
    assert error.msg == (
        f"backend 'llm' (openai) at {calls.OPENAI_ORIGIN} closed the connection in the middle "
        "of a streamed answer"
    )
    assert (len(upstream.sent), sleeps, sink.outputs) == (1, [], [chunk("He")])
    assert cut.closed


def test_silence_after_an_output_fails_the_stream_rather_than_send_it_twice() -> None:
    sink = Sink()
    silent = streamed(sse(chunk("He")), ReadTimeout("sent nothing"))
    caller, upstream, sleeps = make_caller(replying(sink, silent))
    error = failure(caller, chat(), sink)
    assert isinstance(error, StreamBroken)
    assert "sent nothing for" in error.msg
    assert "in the middle of a streamed answer" in error.msg
    assert (len(upstream.sent), sleeps) == (1, [])


def test_silence_before_any_output_is_retried_and_only_the_new_attempt_is_sent() -> None:
    sink = Sink()
    silent = streamed(b": keep-alive\n\n", ReadTimeout("sent nothing"))
    good = streamed(sse(chunk("ok", "stop")), sse("[DONE]"))
    caller, upstream, sleeps = make_caller(replying(sink, silent, good))
    answer = run(caller, chat(), sink)
    assert len(upstream.sent) == 2
    assert len(sleeps) == 1
    assert sink.outputs == [chunk("ok", "stop")]
    assert answer.value["choices"][0]["message"]["content"] == "ok"
    assert silent.closed
    assert good.closed


def test_a_busy_server_is_retried_and_an_error_status_maps_as_without_a_stream() -> None:
    sink = Sink()
    busy = calls.json_answer(503, {"error": "busy"})
    good = streamed(sse(chunk("ok", "stop")), sse("[DONE]"))
    caller, upstream, _ = make_caller(replying(sink, busy, good))
    assert run(caller, chat(), sink).value["choices"][0]["message"]["content"] == "ok"
    assert len(upstream.sent) == 2
    bad = calls.json_answer(400, {"error": {"message": "too long", "type": "invalid_request"}})
    caller, _, _ = make_caller(replying(sink, bad))
    error = failure(caller, chat(), sink)
    assert isinstance(error, ModelRejectedInput)
    assert "too long" in error.msg
    assert bad.closed


def test_a_timeout_retried_until_attempts_run_out_is_the_backend_timeout() -> None:
    sink = Sink()
    replies = [streamed(ReadTimeout("sent nothing")) for _ in range(3)]
    caller, upstream, _ = make_caller(replying(sink, *replies), retry_max_attempts=3)
    error = failure(caller, chat(), sink)
    assert isinstance(error, BackendTimeout)
    assert len(upstream.sent) == 3
    assert sink.outputs == []


def test_a_sink_that_refuses_stops_the_call_at_once() -> None:
    sink = Sink(refuse_after=2)
    reply = streamed(*(sse(c) for c in CHAT), sse("[DONE]"))
    caller, upstream, _ = make_caller(replying(sink, reply))
    error = failure(caller, chat(), sink)
    assert isinstance(error, StreamBroken)
    assert "STREAM_MAX_ENTRIES" in error.msg
    assert sink.outputs == CHAT[:2]
    assert reply.pulled == 3  # nothing more was read after the refusal
    assert reply.closed
    assert len(upstream.sent) == 1


def test_the_deadline_bounds_the_whole_stream() -> None:
    sink = Sink()
    dripping = streamed(*[item for c in CHAT[:5] for item in (sse(c), 0.3)])
    caller, _, _ = make_caller(replying(sink, dripping))
    started = time.monotonic()
    error = failure(caller, chat(deadline=time.time() + 0.45), sink)
    assert isinstance(error, DeadlineExceeded)
    assert "still streaming" in error.msg
    assert time.monotonic() - started < 1.2  # the rest of the body (1.5 s) was not waited for
    assert 1 <= len(sink.outputs) < 5
    assert dripping.closed


# --- through the real pool: a socket server streaming chunked SSE ---------------------------


async def drip(path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
    """Chunked SSE: each CHAT chunk its own HTTP chunk, 0.2 s apart; a request that says `cut`
    has its connection closed after two chunks."""
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    events = [sse(c) for c in CHAT] + [sse("[DONE]")]
    for n, event in enumerate(events):
        if b'"cut"' in body and n == 2:
            await writer.drain()
            return False
        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
        await asyncio.sleep(0.2)
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    return True


def real_caller(url: str) -> Caller:
    backends = {"llm": {"url": url, "protocol": "openai", "read_timeout": 0.5}}
    pool = Pool(connect_timeout=2.0, read_timeout=0.5)
    return Caller(calls.settings(backends=backends), pool)


def test_through_the_pool_the_read_timeout_bounds_each_read_not_the_stream() -> None:
    async def scenario() -> tuple[Answer, Sink, float]:
        async with running(drip) as server:
            caller = real_caller(server.url)
            sink = Sink()
            started = time.monotonic()
            try:
                answer = await caller.predict_answer(chat(), None, sink)
            finally:
                await caller.aclose()
            return answer, sink, time.monotonic() - started

    answer, sink, took = asyncio.run(scenario())
    assert took > 0.5 * 2  # the stream outlasted its read timeout twice over
    assert sink.outputs == CHAT
    assert answer.value["choices"][0]["message"]["content"] == "".join(TOKENS)


def test_through_the_pool_a_connection_closed_mid_body_is_cut_short() -> None:
    async def scenario() -> tuple[Exception, Sink]:
        async with running(drip) as server:
            caller = real_caller(server.url)
            sink = Sink()
            try:
                return await raised(caller, chat("cut"), sink), sink
            finally:
                await caller.aclose()

    error, sink = asyncio.run(scenario())
    assert isinstance(error, StreamBroken)
    assert "closed the connection in the middle of a streamed answer" in error.msg
    assert sink.outputs == CHAT[:2]
