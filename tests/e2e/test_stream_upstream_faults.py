"""Streams that end wrong, end to end: the task fails as issue 18 says, the chunks already sent
stay readable, and the model server's own count of calls shows what was retried.

Real redis-server, Celery worker and API (tests/backends/stack.py's stack, no TorchServe); the
model server is tests/support/stream_upstream.py, a real HTTP server on 127.0.0.1 that streams
its script and breaks it on cue (no real server stops without `[DONE]`, cuts its chunked body or
goes silent when told). Covered, per worker/backends/stream_call.py's rules:
- an OpenAI stream that ends (cleanly, or cut) after 3 chunks with neither `[DONE]` nor a
  finish_reason: failed `stream_broken` (502), the 3 chunks then `error` on the stream, live
  and for a reader who comes after the end;
- an `{"error": ...}` chunk after the 200: a server-side one is `backend_error` naming its type
  and code but not its message (which may quote the input), in no answer or log; an input one
  is `model_rejected_input` (422) with the server's message;
- an OIP stream cut short mid-body, or carrying an error response: failed, its responses kept;
- a server silent for longer than the backend's read timeout after its first chunk: failed
  `stream_broken`, one call (no retry once an output was sent); silent before the first chunk:
  retried, one output each, succeeded (two calls);
- a 503 before any chunk: retried (two identical calls), every chunk exactly once, succeeded,
  `done` carrying the assembled completion.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.backends.stack import BackendStack, backend_stack
from tests.support.scripted_backend import Step
from tests.support.sse_reader import Reading, read_events
from tests.support.stream_upstream import Streamed, StreamUpstream, sse

pytestmark = pytest.mark.e2e

MODEL = "tiny-llm"
READ_TIMEOUT = 10.0
SILENT_TIMEOUT = 1.0  # the `oa-slow` backend's read timeout: what "silent" means there
CHAT_PATH = "/oa/v1/chat/completions"
SLOW_PATH = "/slow/v1/chat/completions"
OIP_PATH = f"/oip/v2/models/{MODEL}/infer_stream"
SECRET = "SECRET-prompt-text-7d1e"  # what a server's error message may quote of the input
ENV = {"RETRY_MAX_ATTEMPTS": "3", "RETRY_BACKOFF_INITIAL": "0.1", "RETRY_BACKOFF_MAX": "0.3"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[StreamUpstream]:
    with StreamUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def dispatcher(
    upstream: StreamUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackendStack]:
    backends = {
        "oa": {"url": f"{upstream.url}/oa/v1", "protocol": "openai", "read_timeout": READ_TIMEOUT},
        "oa-slow": {
            "url": f"{upstream.url}/slow/v1",
            "protocol": "openai",
            "read_timeout": SILENT_TIMEOUT,
        },
        "oip": {"url": f"{upstream.url}/oip", "protocol": "oip", "read_timeout": READ_TIMEOUT},
    }
    root = tmp_path_factory.mktemp("stream-faults")
    with backend_stack(root, backends, default="oa", env=ENV) as stack:
        yield stack


def chunk(i: int, text: str, finish: str | None = None) -> dict[str, Any]:
    """A `chat.completion.chunk` as llama.cpp and vLLM send them."""
    delta = {"role": "assistant", "content": text} if i == 0 else {"content": text}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": "chatcmpl-f1", "object": "chat.completion.chunk", "created": 1700000000,
            "model": MODEL, "choices": [choice]}  # fmt: skip


def oip_response(i: int) -> dict[str, Any]:
    output = {"name": "token", "datatype": "BYTES", "shape": [1], "data": [f"tok{i}"]}
    return {"model_name": MODEL, "id": "r-1", "outputs": [output]}


THREE = [chunk(0, "One"), chunk(1, " two"), chunk(2, " three")]
CHAT_INPUT = {"messages": [{"role": "user", "content": SECRET}], "max_tokens": 8}
OIP_INPUT = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [SECRET]}]}


def streamed(
    dispatcher: BackendStack, backend: str, body: dict[str, Any]
) -> tuple[str, Reading, dict[str, Any]]:
    """Submit `body` streamed (202), read its stream to the end: task id, events, task view."""
    request = {"model_name": MODEL, "backend": backend, "input": body, "stream": True}
    accepted = dispatcher.dispatch(request, wait=0)
    assert accepted.status_code == 202, accepted.text
    task_id = accepted.json()["task_id"]
    reading = read_events(dispatcher.http, accepted.json()["stream_url"])
    assert reading.status == 200, reading
    return task_id, reading, dispatcher.task(task_id)


def failed(
    dispatcher: BackendStack, reading: Reading, view: dict[str, Any], outputs: list[Any]
) -> dict[str, Any]:
    """Check the stream is `outputs` then `error`, the same for a reader after the end, and
    the task failed with that error; the error body."""
    kinds = [event.kind for event in reading.events]
    assert kinds == ["output"] * len(outputs) + ["error"], kinds
    assert [event.json() for event in reading.outputs] == outputs
    assert view["status"] == "failed", view
    error: dict[str, Any] = reading.events[-1].json()
    assert error == view["error"]
    late = read_events(dispatcher.http, f"/tasks/{view['task_id']}/stream")
    assert [(e.kind, e.id, e.data) for e in late.events] == [
        (e.kind, e.id, e.data) for e in reading.events
    ]
    return error


@pytest.mark.parametrize("ending", ["complete", "cut"])
def test_an_openai_stream_without_done_or_finish_reason_is_stream_broken(
    dispatcher: BackendStack, upstream: StreamUpstream, ending: Any
) -> None:
    upstream.script(CHAT_PATH, Streamed(sse(*THREE), ending=ending))
    _, reading, view = streamed(dispatcher, "oa", CHAT_INPUT)
    error = failed(dispatcher, reading, view, THREE)
    assert (error["status"], error["code"]) == (502, "stream_broken"), error
    assert error["msg"].startswith("backend 'oa' (openai) at http://127.0.0.1:"), error
    if ending == "complete":
        assert "ended without [DONE] and without a finish_reason" in error["msg"], error
    else:
        assert "closed the connection in the middle of a streamed answer" in error["msg"], error
    assert upstream.count(CHAT_PATH) == 1  # not retried: three outputs were sent
    [call] = upstream.calls(CHAT_PATH)
    sent = call.json()
    assert (sent["stream"], sent["stream_options"], sent["model"]) == (
        True, {"include_usage": True}, MODEL)  # fmt: skip


def test_a_server_error_chunk_fails_without_its_message(
    dispatcher: BackendStack, upstream: StreamUpstream
) -> None:
    bad = {"error": {"message": f"CUDA out of memory on {SECRET}", "type": "server_error",
                     "code": 500}}  # fmt: skip
    upstream.script(CHAT_PATH, Streamed(sse(*THREE[:2], bad, "[DONE]")))
    _, reading, view = streamed(dispatcher, "oa", CHAT_INPUT)
    error = failed(dispatcher, reading, view, THREE[:2])
    assert (error["status"], error["code"]) == (502, "backend_error"), error
    assert "failed mid-stream (type 'server_error', code '500')" in error["msg"], error
    assert "see the backend's log" in error["msg"]
    assert SECRET not in error["msg"], error
    assert "CUDA" not in error["msg"], error
    assert SECRET not in str(view)
    assert SECRET not in dispatcher.logs(lines=100_000)
    assert upstream.count(CHAT_PATH) == 1


def test_an_input_error_chunk_is_422_with_the_servers_message(
    dispatcher: BackendStack, upstream: StreamUpstream
) -> None:
    said = "the prompt is longer than the context (1024 tokens)"
    bad = {"error": {"message": said, "type": "exceed_context_size_error", "code": 400}}
    upstream.script(CHAT_PATH, Streamed(sse(THREE[0], bad)))
    _, reading, view = streamed(dispatcher, "oa", CHAT_INPUT)
    error = failed(dispatcher, reading, view, THREE[:1])
    assert (error["status"], error["code"]) == (422, "model_rejected_input"), error
    assert error["msg"].endswith(f"rejected the input mid-stream: {said}"), error
    assert upstream.count(CHAT_PATH) == 1


@pytest.mark.parametrize("fault", ["cut", "error_response"])
def test_an_oip_stream_that_breaks_fails_with_its_responses_kept(
    dispatcher: BackendStack, upstream: StreamUpstream, fault: str
) -> None:
    responses = [oip_response(i) for i in range(2)]
    if fault == "cut":
        step = Streamed(sse(*responses), ending="cut")
    else:
        step = Streamed(sse(*responses, {"error": f"model crashed on {SECRET}"}))
    upstream.script(OIP_PATH, step)
    _, reading, view = streamed(dispatcher, "oip", OIP_INPUT)
    error = failed(dispatcher, reading, view, responses)
    assert error["msg"].startswith("backend 'oip' (oip) at http://127.0.0.1:"), error
    if fault == "cut":
        assert (error["status"], error["code"]) == (502, "stream_broken"), error
        assert "closed the connection in the middle of a streamed answer" in error["msg"]
    else:
        assert (error["status"], error["code"]) == (502, "backend_error"), error
        assert "failed mid-stream after 2 responses" in error["msg"], error
        assert SECRET not in error["msg"]
    assert upstream.count(OIP_PATH) == 1
    assert upstream.calls(OIP_PATH)[0].json() == OIP_INPUT  # the body as given, to _stream


def test_an_oip_stream_that_ends_cleanly_gives_its_last_response(
    dispatcher: BackendStack, upstream: StreamUpstream
) -> None:
    responses = [oip_response(i) for i in range(3)]
    upstream.script(OIP_PATH, Streamed(sse(*responses)))
    _, reading, view = streamed(dispatcher, "oip", OIP_INPUT)
    assert [event.kind for event in reading.events] == ["output"] * 3 + ["done"]
    assert [event.json() for event in reading.outputs] == responses
    assert view["status"] == "succeeded", view
    assert view["prediction_value"] == responses[-1]
    assert reading.events[-1].json()["prediction_value"] == responses[-1]


def test_silence_after_the_first_chunk_fails_and_is_not_retried(
    dispatcher: BackendStack, upstream: StreamUpstream
) -> None:
    upstream.script(SLOW_PATH, Streamed(sse(THREE[0]), ending="hang"))
    try:
        _, reading, view = streamed(dispatcher, "oa-slow", CHAT_INPUT)
    finally:
        upstream.release()
    error = failed(dispatcher, reading, view, THREE[:1])
    assert (error["status"], error["code"]) == (502, "stream_broken"), error
    expected = f"sent nothing for {SILENT_TIMEOUT:g}s in the middle of a streamed answer"
    assert expected in error["msg"], error
    assert upstream.count(SLOW_PATH) == 1  # three attempts allowed; one output was out


def whole_stream() -> tuple[list[dict[str, Any]], Streamed]:
    """A stream that ends right: 3 chunks, the last with its finish reason, usage, [DONE]."""
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    chunks = [*THREE[:2], {**chunk(2, " three", "stop"), "usage": usage}]
    return chunks, Streamed(sse(*chunks, "[DONE]"))


def assembled(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    message = {"role": "assistant", "content": "One two three"}
    return {"id": "chatcmpl-f1", "object": "chat.completion", "created": 1700000000,
            "model": MODEL, "usage": chunks[-1]["usage"],
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": "stop"}]}  # fmt: skip


def test_a_503_before_any_chunk_is_retried_and_streams_once(
    dispatcher: BackendStack, upstream: StreamUpstream
) -> None:
    chunks, stream = whole_stream()
    busy = Step(503, {"error": {"message": "busy", "type": "server_error", "code": 503}})
    upstream.script(CHAT_PATH, busy, stream)
    task_id, reading, view = streamed(dispatcher, "oa", CHAT_INPUT)
    assert [event.kind for event in reading.events] == ["output"] * 3 + ["done"]  # no restart
    assert [event.json() for event in reading.outputs] == chunks
    assert view["status"] == "succeeded", view
    assert view["prediction_value"] == assembled(chunks)
    done = reading.events[-1].json()
    assert (done["task_id"], done["prediction_value"]) == (task_id, assembled(chunks))
    calls = upstream.calls(CHAT_PATH)
    assert [call.status for call in calls] == [503, 200]
    assert calls[0].body == calls[1].body


def test_silence_before_the_first_chunk_is_retried(
    dispatcher: BackendStack, upstream: StreamUpstream
) -> None:
    chunks, stream = whole_stream()
    upstream.script(SLOW_PATH, Streamed((), ending="hang"), stream)
    try:
        _, reading, view = streamed(dispatcher, "oa-slow", CHAT_INPUT)
    finally:
        upstream.release()
    assert [event.kind for event in reading.events] == ["output"] * 3 + ["done"]
    assert [event.json() for event in reading.outputs] == chunks
    assert view["status"] == "succeeded", view
    assert view["prediction_value"] == assembled(chunks)
    assert upstream.count(SLOW_PATH) == 2  # the first sent headers, then nothing: no output
