"""TorchServe streams (worker/backends/stream_torchserve.py): each HTTP/1.1 chunk (one
`send_intermediate_predict_response`) is one output, decoded as a whole answer is (JSON, text,
else a data URI), however the transport splits its bytes; the final result is the concatenated
body parsed as the non-streamed answer would be; a chunk over the limit is StreamBroken."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from shared.errors import StreamBroken
from worker.backends.base import Answer, parse_answer
from worker.backends.stream_decoder import StreamContext, cut_short
from worker.backends.stream_torchserve import TorchServeStream

WHERE = "TorchServe at http://127.0.0.1:8080"


def drive(
    chunks: list[bytes], content_type: str | None = None, piece: int = 0
) -> tuple[list[Any], Answer]:
    """Outputs and answer of HTTP chunks `chunks`, each fed in reads of `piece` bytes (0: whole),
    with chunk_end at each chunk's end and once more at the body's end (as the caller does)."""
    decode = TorchServeStream(StreamContext(WHERE, "predictions", content_type))
    outputs: list[Any] = []
    for chunk in chunks:
        size = piece or max(len(chunk), 1)
        for start in range(0, len(chunk), size):
            assert decode.feed(chunk[start : start + size]) == []  # outputs wait for the chunk end
        outputs += decode.chunk_end()
    outputs += decode.chunk_end()
    return outputs, decode.end()


TOKENS = [json.dumps({"token": t, "i": i}).encode() for i, t in enumerate(["Hé", "llo", " 🙂"])]


@pytest.mark.parametrize("piece", [0, 1, 2, 3, 5])
def test_json_chunks_are_outputs_however_the_reads_split(piece: int) -> None:
    outputs, answer = drive(TOKENS, piece=piece)
    assert outputs == [{"token": "Hé", "i": 0}, {"token": "llo", "i": 1}, {"token": " 🙂", "i": 2}]
    # The final result is the body as a non-streamed call reads it: here not one JSON document.
    assert answer == parse_answer(b"".join(TOKENS), None)
    assert answer.value == b"".join(TOKENS).decode()


def test_text_chunks_are_strings_and_the_final_is_the_joined_text() -> None:
    chunks = [b"Once ", "upon a tïme".encode(), " 日本".encode()]
    outputs, answer = drive(chunks, "text/plain; charset=utf-8", piece=1)  # splits mid-UTF-8
    assert outputs == ["Once ", "upon a tïme", " 日本"]
    assert answer == Answer("Once upon a tïme 日本", "text/plain; charset=utf-8")


def test_one_json_chunk_is_the_final_json_answer() -> None:
    outputs, answer = drive([b'{"scores": [0.25, 0.75]}'])
    assert outputs == [{"scores": [0.25, 0.75]}]
    assert answer == Answer({"scores": [0.25, 0.75]})


def test_binary_chunks_are_data_uris_and_so_is_the_body() -> None:
    frames = [b"\x89PNG\r\n\x1a\n\x00\xff", b"\xff\xd8\xff\xe0\x00"]
    outputs, answer = drive(frames, "image/png", piece=3)
    assert outputs == [
        "data:image/png;base64," + base64.b64encode(frame).decode() for frame in frames
    ]
    assert answer == Answer("data:image/png;base64," + base64.b64encode(b"".join(frames)).decode(),
                            "image/png")  # fmt: skip


def test_bytes_that_are_not_utf8_without_a_content_type_are_a_data_uri() -> None:
    [output], answer = drive([b"\xff\xfe\x00"])
    assert (
        output
        == "data:application/octet-stream;base64," + base64.b64encode(b"\xff\xfe\x00").decode()
    )
    assert answer.content_type == "application/octet-stream"


def test_empty_chunks_and_repeated_chunk_ends_output_nothing() -> None:
    decode = TorchServeStream(StreamContext(WHERE))
    assert decode.chunk_end() == []
    decode.feed(b"1")
    assert decode.chunk_end() == [1]
    assert decode.chunk_end() == []
    assert decode.end() == Answer(1)


def test_a_body_without_chunk_boundaries_is_one_output_at_its_end() -> None:
    decode = TorchServeStream(StreamContext(WHERE))
    for byte in b'{"a": 1}':
        assert decode.feed(bytes([byte])) == []
    assert decode.chunk_end() == [{"a": 1}]


def test_a_chunk_over_the_limit_is_broken_and_the_limit_is_per_chunk() -> None:
    decode = TorchServeStream(StreamContext(WHERE, max_event_bytes=8))
    decode.feed(b"12345678")
    assert decode.chunk_end() == [12345678]
    decode.feed(b"1234")  # the body is over 8 bytes, each chunk is not
    decode.feed(b"5678")
    assert decode.chunk_end() == [12345678]
    decode.feed(b"12345")
    with pytest.raises(StreamBroken, match=r"chunk over 8 bytes") as raised:
        decode.feed(b"6789")
    assert "6789" not in raised.value.msg


def test_a_cut_body_is_stream_broken() -> None:
    error = cut_short(WHERE)
    assert (type(error), error.code, error.status) == (StreamBroken, "stream_broken", 502)
    assert error.msg == f"{WHERE} closed the connection in the middle of a streamed answer"
