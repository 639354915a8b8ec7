"""OIP streams (worker/backends/stream_oip.py): MLServer's `infer_stream` and Triton's
`generate_stream` as SSE, each response an output however the bytes split, the last response
the final result (nothing assembled), an error object after the 200 a BackendFailed that keeps
none of its text, a stream without any response StreamBroken."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from shared.errors import BackendFailed, DispatchError, StreamBroken
from worker.backends.base import Answer
from worker.backends.stream_decoder import StreamContext
from worker.backends.stream_oip import OIPStream

WHERE = "backend 'mls' (oip) at http://127.0.0.1:9100"
EVENT_STREAM = "text/event-stream; charset=utf-8"


def sse(*responses: Any) -> bytes:
    return "".join(f"data: {json.dumps(r, ensure_ascii=False)}\n\n" for r in responses).encode()


def drive(stream: bytes, *splits: int, operation: str = "infer") -> tuple[list[Any], Answer]:
    decode = OIPStream(StreamContext(WHERE, operation, EVENT_STREAM))
    bounds = [0, *splits, len(stream)]
    outputs: list[Any] = []
    for start, end in itertools.pairwise(bounds):
        outputs += decode.feed(stream[start:end])
    return outputs, decode.end()


def failed(stream: bytes, content_type: str = EVENT_STREAM) -> DispatchError:
    decode = OIPStream(StreamContext(WHERE, "infer", content_type))
    try:
        decode.feed(stream)
        decode.end()
    except DispatchError as error:
        return error
    raise AssertionError("the stream decoded")


def infer_response(word: str) -> dict[str, Any]:
    """An MLServer inference response, as its text model example streams one per word."""
    return {
        "model_name": "text-model",
        "id": "4a9e-b1",
        "parameters": {},
        "outputs": [{"name": "output", "shape": [1, 1], "datatype": "BYTES",
                     "parameters": {"content_type": "str"}, "data": [word]}],
    }  # fmt: skip


INFER = [infer_response(word) for word in ["Hé", "llo", "wörld"]]
GENERATE = [
    {"model_name": "vllm_model", "model_version": "1", "text_output": text}
    for text in ["Paris", " is", " the capital 🙂"]
]


@pytest.mark.parametrize(("responses", "operation"), [(INFER, "infer"), (GENERATE, "generate")])
def test_each_response_is_an_output_and_the_last_is_the_final(
    responses: list[Any], operation: str
) -> None:
    stream = sse(*responses)
    whole = drive(stream, operation=operation)
    assert whole == (responses, Answer(responses[-1]))
    for position in range(len(stream) + 1):
        assert drive(stream, position, operation=operation) == whole, position


def test_generate_text_is_not_assembled() -> None:
    # Whether text_output is the new text or all of it is the model's: nothing is guessed.
    assert drive(sse(*GENERATE), operation="generate")[1].value["text_output"] == " the capital 🙂"


def test_crlf_comments_and_a_done_are_read() -> None:
    stream = (b": keep-alive\r\n\r\n" + sse(*INFER) + b"data: [DONE]\n\n").replace(b"\n", b"\r\n")
    assert drive(stream) == (INFER, Answer(INFER[-1]))


@pytest.mark.parametrize(
    "stream",
    [
        sse(GENERATE[0], {"error": "the input 'my private prompt' broke the model"}),
        b'event: error\ndata: {"message": "my private prompt"}\n\n',
    ],
)
def test_an_error_after_the_200_is_backend_failed_without_its_text(stream: bytes) -> None:
    error = failed(stream)
    assert type(error) is BackendFailed
    assert error.msg.startswith(f"{WHERE} failed mid-stream after ")
    assert "private" not in error.msg


def test_the_error_says_how_many_responses_came_first() -> None:
    assert "after 1 response;" in failed(sse(GENERATE[0], {"error": "x"})).msg
    assert "after 0 responses;" in failed(sse({"error": "x"})).msg


def test_a_stream_without_a_response_is_broken() -> None:
    error = failed(b": keep-alive\n\n")
    assert isinstance(error, StreamBroken)
    assert error.msg == f"{WHERE}: the stream ended before any response"


def test_a_json_answer_where_a_stream_was_asked_is_named() -> None:
    error = failed(json.dumps(INFER[0]).encode(), "application/json")
    assert isinstance(error, StreamBroken)
    assert error.msg.endswith("(it answered application/json, not text/event-stream)")


@pytest.mark.parametrize("data", [b"data: [1]\n\n", b'data: "text"\n\n', b"data: {cut\n\n"])
def test_a_response_that_is_not_a_json_object_is_broken(data: bytes) -> None:
    assert isinstance(failed(data), StreamBroken)


def test_an_event_over_the_limit_is_broken() -> None:
    decode = OIPStream(StreamContext(WHERE, "infer", EVENT_STREAM, max_event_bytes=100))
    with pytest.raises(StreamBroken, match="event is over 100 bytes"):
        decode.feed(b"data: " + json.dumps(INFER[0]).encode()[:60] + b"\ndata: " + b"x" * 60)
