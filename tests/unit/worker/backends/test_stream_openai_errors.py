"""OpenAI-compatible streams that end wrong (worker/backends/stream_openai.py): without
`[DONE]` or a finish reason, an error chunk or event after the 200 (mapped as an error status
would be, the token redacted, a server error's text never kept), chunks that are not JSON
objects, and the size limits."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.errors import BackendFailed, ModelRejectedInput, StreamBroken
from tests.unit.worker.backends.test_stream_openai import (
    EVENT_STREAM,
    LLAMACPP,
    TOKEN,
    WHERE,
    decoder,
    drive,
    failed,
    sse,
)
from worker.backends.base import MESSAGE_CHARS, REDACTED
from worker.backends.stream_decoder import StreamContext
from worker.backends.stream_openai import OpenAIStream


def test_a_stream_without_done_or_finish_reason_is_broken() -> None:
    error = failed(sse(*LLAMACPP[:-1], done=False))
    assert isinstance(error, StreamBroken)
    assert (error.code, error.status) == ("stream_broken", 502)
    assert error.msg == f"{WHERE}: the stream ended without [DONE] and without a finish_reason"


def test_an_empty_stream_is_broken_and_a_json_answer_is_named() -> None:
    decode = decoder(content_type="application/json")
    decode.feed(json.dumps(LLAMACPP[0]).encode())
    with pytest.raises(StreamBroken, match=r"answered application/json, not text/event-stream"):
        decode.end()


def test_a_finish_reason_without_done_is_a_complete_answer() -> None:
    outputs, answer = drive(sse(*LLAMACPP, done=False))
    assert outputs == LLAMACPP
    assert answer.value["choices"][0]["message"]["content"] == "Hello, wörld 🙂"


def test_a_done_without_its_empty_line_is_not_an_end() -> None:
    error = failed(sse(*LLAMACPP[:-1], done=False) + b"data: [DONE]")
    assert isinstance(error, StreamBroken)


@pytest.mark.parametrize(
    "chunk",
    [
        {"error": {"code": 400, "message": f"the request exceeds the context ({TOKEN})",
                   "type": "exceed_context_size_error"}},  # llama.cpp
        {"error": {"object": "error", "message": f"bad input {TOKEN}", "type": "BadRequestError",
                   "param": None, "code": 400}},  # vLLM 0.6+
        {"object": "error", "message": f"bad input {TOKEN}", "type": "BadRequestError",
         "code": 400},  # older vLLM
        {"error": {"message": f"bad input {TOKEN}", "type": "invalid_request_error",
                   "code": "context_length_exceeded"}},  # OpenAI
    ],
)  # fmt: skip
def test_an_input_error_after_the_200_is_model_rejected_input_redacted(chunk: Any) -> None:
    error = failed(sse(LLAMACPP[0], LLAMACPP[1], chunk))
    assert isinstance(error, ModelRejectedInput)
    assert error.status == 422
    assert error.msg.startswith(f"{WHERE} rejected the input mid-stream: ")
    assert TOKEN not in error.msg
    assert REDACTED in error.msg


def test_a_long_error_message_is_cut_after_redaction() -> None:
    chunk = {"error": {"code": 400, "message": "x" * (MESSAGE_CHARS - 4) + TOKEN}}
    error = failed(sse(chunk))
    assert TOKEN[:4] not in error.msg
    assert error.msg.endswith("x" * (MESSAGE_CHARS - 4) + REDACTED[:4])


@pytest.mark.parametrize(
    "chunk",
    [
        {"error": {"code": 500, "message": "failed on 'the user prompt'", "type": "server_error"}},
        {"error": {"message": "CUDA out of memory for 'the user prompt'"}},
        {"error": "the user prompt broke it"},
    ],
)
def test_a_server_error_after_the_200_is_backend_failed_without_its_text(chunk: Any) -> None:
    error = failed(sse(LLAMACPP[0], chunk))
    assert type(error) is BackendFailed
    assert error.msg.startswith(f"{WHERE} failed mid-stream")
    assert "prompt" not in error.msg  # a server error's text may quote the input


def test_a_server_error_names_its_type_and_code_redacted() -> None:
    error = failed(sse({"error": {"code": 503, "type": f"overloaded {TOKEN}"}}))
    assert error.msg == (
        f"{WHERE} failed mid-stream (type 'overloaded {REDACTED}', code '503'); see the "
        "backend's log for its message"
    )


def test_an_error_event_fails_the_stream() -> None:
    error = failed(b'event: error\ndata: {"message": "boom"}\n\n')
    assert isinstance(error, BackendFailed)
    error = failed(b"event: error\ndata: [1]\n\n")
    assert isinstance(error, BackendFailed)


def test_a_chunk_that_is_not_json_is_broken_without_quoting_it() -> None:
    error = failed(sse(LLAMACPP[0]) + b"data: {the model's secret output\n\n")
    assert isinstance(error, StreamBroken)
    assert "secret" not in error.msg
    assert "not JSON" in error.msg


def test_a_chunk_that_is_not_an_object_is_broken() -> None:
    error = failed(b"data: [1, 2]\n\n")
    assert isinstance(error, StreamBroken)
    assert error.msg.endswith("not an object (list)")


def test_an_event_over_the_limit_is_broken() -> None:
    decode = OpenAIStream(StreamContext(WHERE, "chat.completions", EVENT_STREAM, max_line_bytes=64))
    with pytest.raises(StreamBroken, match="line is over 64 bytes"):
        decode.feed(sse(*LLAMACPP))
