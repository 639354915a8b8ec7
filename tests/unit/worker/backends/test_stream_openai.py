"""OpenAI-compatible streams (worker/backends/stream_openai.py, stream_assemble.py) on chunk
sequences shaped as llama.cpp and vLLM send them: every chunk output as sent however the bytes
split, the assembled `chat.completion` / `text_completion` equal to the non-streamed answer's
shape (role-only first delta, content deltas, finish reason, usage chunk, tool calls, logprobs,
n > 1), error chunks after the 200 mapped and redacted, and a stream without `[DONE]`."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from shared.errors import DispatchError
from worker.backends.base import REDACTED, Answer
from worker.backends.stream_decoder import StreamContext
from worker.backends.stream_openai import OpenAIStream

WHERE = "backend 'llm' (openai) at http://127.0.0.1:9200"
TOKEN = "sk-s3cret-token"
EVENT_STREAM = "text/event-stream"
TOP = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1754523863}


def redact(text: str) -> str:
    return text.replace(TOKEN, REDACTED)


def decoder(operation: str = "chat.completions", content_type: str = EVENT_STREAM) -> OpenAIStream:
    return OpenAIStream(StreamContext(WHERE, operation, content_type, redact))


def sse(*chunks: Any, done: bool = True) -> bytes:
    events = [f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n" for chunk in chunks]
    return "".join(events + (["data: [DONE]\n\n"] if done else [])).encode()


def drive(
    stream: bytes, *splits: int, operation: str = "chat.completions"
) -> tuple[list[Any], Answer]:
    """The outputs and the final answer of `stream` fed in pieces cut at `splits`."""
    decode = decoder(operation)
    bounds = [0, *splits, len(stream)]
    outputs: list[Any] = []
    for start, end in itertools.pairwise(bounds):
        outputs += decode.feed(stream[start:end])
    return outputs, decode.end()


def failed(stream: bytes, operation: str = "chat.completions") -> DispatchError:
    decode = decoder(operation)
    try:
        decode.feed(stream)
        decode.end()
    except DispatchError as error:
        return error
    raise AssertionError("the stream decoded")


def llamacpp_chunk(
    delta: dict[str, Any], finish: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
        "created": 1754523863,
        "id": "chatcmpl-X6ur",
        "model": "qwen2.5-0.5b",
        "system_fingerprint": "b6097-9515c613",
        "object": "chat.completion.chunk",
        **extra,
    }


# llama.cpp's server (b6097): a role-only first delta with content null, content deltas, a
# last chunk with the finish reason, an empty delta, usage and timings.
LLAMACPP = [
    llamacpp_chunk({"role": "assistant", "content": None}),
    llamacpp_chunk({"content": "Hel"}),
    llamacpp_chunk({"content": "lo, wörld"}),
    llamacpp_chunk({"content": " 🙂"}),
    llamacpp_chunk(
        {},
        "stop",
        usage={"completion_tokens": 4, "prompt_tokens": 9, "total_tokens": 13},
        timings={"prompt_n": 9, "predicted_n": 4},
    ),
]


def vllm_chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {**TOP, "model": "facebook/opt-125m", "choices": choices, **extra}


# vLLM 0.6 with stream_options.include_usage: a role-only first delta with content "", the
# content, the finish reason with stop_reason, then a usage chunk without choices.
VLLM = [
    vllm_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}], usage=None),
    vllm_chunk([{"index": 0, "delta": {"content": "Paris"}, "logprobs": None,
                 "finish_reason": None}], usage=None),
    vllm_chunk([{"index": 0, "delta": {"content": "."}, "logprobs": None,
                 "finish_reason": "stop", "stop_reason": None}], usage=None),
    vllm_chunk([], usage={"prompt_tokens": 12, "total_tokens": 14, "completion_tokens": 2}),
]  # fmt: skip


def test_llamacpp_chat_outputs_every_chunk_and_assembles_the_completion() -> None:
    outputs, answer = drive(sse(*LLAMACPP))
    assert outputs == LLAMACPP
    assert answer == Answer(
        {
            "id": "chatcmpl-X6ur",
            "object": "chat.completion",
            "created": 1754523863,
            "model": "qwen2.5-0.5b",
            "system_fingerprint": "b6097-9515c613",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello, wörld 🙂"},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"completion_tokens": 4, "prompt_tokens": 9, "total_tokens": 13},
        }
    )


def test_vllm_chat_with_a_usage_chunk_assembles_the_completion() -> None:
    outputs, answer = drive(sse(*VLLM))
    assert outputs == VLLM
    assert answer.value == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1754523863,
        "model": "facebook/opt-125m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Paris."},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "total_tokens": 14, "completion_tokens": 2},
    }
    assert "system_fingerprint" not in answer.value  # only when sent


@pytest.mark.parametrize("chunks", [LLAMACPP, VLLM], ids=["llamacpp", "vllm"])
def test_a_split_at_any_byte_gives_the_same_outputs_and_answer(chunks: list[Any]) -> None:
    stream = sse(*chunks)
    whole = drive(stream)
    for position in range(len(stream) + 1):
        assert drive(stream, position) == whole, position


def test_one_byte_at_a_time_gives_the_same_outputs_and_answer() -> None:
    stream = sse(*LLAMACPP).replace(b"\n", b"\r\n")
    assert drive(stream, *range(1, len(stream))) == drive(sse(*LLAMACPP))


def test_keep_alive_comments_and_crlf_are_read_as_any_sse_client_does() -> None:
    stream = b": ping\r\n\r\n" + sse(*VLLM).replace(b"\n", b"\r\n")
    assert drive(stream)[0] == VLLM


def test_tool_calls_merge_by_index_and_content_is_null() -> None:
    first = {
        "index": 0,
        "id": "call_a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    second = {
        "index": 1,
        "id": "call_b",
        "type": "function",
        "function": {"name": "get_time", "arguments": ""},
    }
    chunks = [
        vllm_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}]),
        vllm_chunk([{"index": 0, "delta": {"tool_calls": [first]}}]),
        vllm_chunk(
            [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
                }
            ]
        ),
        vllm_chunk([{"index": 0, "delta": {"tool_calls": [second]}}]),
        vllm_chunk(
            [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
                }
            ]
        ),
        vllm_chunk(
            [{"index": 0, "delta": {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}}]
        ),
        vllm_chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
    ]
    [choice] = drive(sse(*chunks))[1].value["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function",
             "function": {"name": "get_time", "arguments": "{}"}},
        ],
    }  # fmt: skip


def test_refusal_reasoning_and_logprobs_join_when_sent() -> None:
    def logprob(token: str) -> dict[str, Any]:
        return {"token": token, "logprob": -0.1, "bytes": list(token.encode()), "top_logprobs": []}

    chunks = [
        vllm_chunk([{"index": 0, "delta": {"role": "assistant", "reasoning_content": "Think"}}]),
        vllm_chunk([{"index": 0, "delta": {"reasoning_content": "ing."}}]),
        vllm_chunk(
            [{"index": 0, "delta": {"content": "No"}, "logprobs": {"content": [logprob("No")]}}]
        ),
        vllm_chunk(
            [{"index": 0, "delta": {"refusal": "I can"}, "logprobs": {"content": [logprob("!")]}}]
        ),
        vllm_chunk([{"index": 0, "delta": {"refusal": "not."}, "finish_reason": "stop"}]),
    ]
    [choice] = drive(sse(*chunks))[1].value["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": "No",
        "reasoning_content": "Thinking.",
        "refusal": "I cannot.",
    }
    assert choice["logprobs"] == {"content": [logprob("No"), logprob("!")]}


def test_interleaved_choices_of_n_2_assemble_in_index_order() -> None:
    chunks = [
        vllm_chunk([{"index": 1, "delta": {"role": "assistant", "content": "B"}}]),
        vllm_chunk([{"index": 0, "delta": {"role": "assistant", "content": "A"}}]),
        vllm_chunk([{"index": 0, "delta": {"content": "a"}, "finish_reason": "length"}]),
        vllm_chunk([{"index": 1, "delta": {"content": "b"}, "finish_reason": "stop"}]),
    ]
    choices = drive(sse(*chunks))[1].value["choices"]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in choices] == [
        (0, "Aa", "length"),
        (1, "Bb", "stop"),
    ]


def completion_chunk(
    index: int, text: str, finish: str | None = None, **extra: Any
) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": "cmpl-9", "object": "text_completion", "created": 5, "model": "m",
            "choices": [choice], **extra}  # fmt: skip


def test_completions_assemble_a_text_completion() -> None:
    chunks = [
        completion_chunk(0, "Once"),
        completion_chunk(1, "In"),
        completion_chunk(0, " upon", "length"),
        completion_chunk(1, " a land", "stop"),
        {"id": "cmpl-9", "object": "text_completion", "created": 5, "model": "m", "choices": [],
         "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
    ]  # fmt: skip
    outputs, answer = drive(sse(*chunks), operation="completions")
    assert outputs == chunks
    assert answer.value == {
        "id": "cmpl-9",
        "object": "text_completion",
        "created": 5,
        "model": "m",
        "choices": [
            {"index": 0, "text": "Once upon", "logprobs": None, "finish_reason": "length"},
            {"index": 1, "text": "In a land", "logprobs": None, "finish_reason": "stop"},
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }


def test_completion_logprobs_join_list_by_list() -> None:
    def logprobs(token: str, offset: int) -> dict[str, Any]:
        return {"tokens": [token], "token_logprobs": [-1.0], "top_logprobs": [{token: -1.0}],
                "text_offset": [offset]}  # fmt: skip

    chunks = [
        {
            **completion_chunk(0, "a"),
            "choices": [{"index": 0, "text": "a", "logprobs": logprobs("a", 0)}],
        },
        {
            **completion_chunk(0, "b"),
            "choices": [
                {"index": 0, "text": "b", "logprobs": logprobs("b", 1), "finish_reason": "stop"}
            ],
        },
    ]
    [choice] = drive(sse(*chunks), operation="completions")[1].value["choices"]
    assert choice["logprobs"] == {
        "tokens": ["a", "b"],
        "token_logprobs": [-1.0, -1.0],
        "top_logprobs": [{"a": -1.0}, {"b": -1.0}],
        "text_offset": [0, 1],
    }


def test_the_last_usage_sent_wins() -> None:
    chunks = [*LLAMACPP[:-1], llamacpp_chunk({}, "stop", usage={"total_tokens": 1})]
    chunks.append(vllm_chunk([], usage={"total_tokens": 2}))
    assert drive(sse(*chunks))[1].value["usage"] == {"total_tokens": 2}


def test_nothing_after_done_is_read() -> None:
    decode = decoder()
    assert decode.feed(sse(*VLLM)) == VLLM
    assert decode.feed(b"data: not json\n\n" + sse(*VLLM)) == []
    assert decode.end().value["choices"][0]["message"]["content"] == "Paris."
