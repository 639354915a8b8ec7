"""The OIP binary tensor data extension (worker/backends/oip_binary.py): the request body of
bytes, and answers with binary outputs decoded into the JSON inference response, through the
Caller on a fake upstream; a malformed binary answer is BackendFailed, and its message never
carries the body's bytes."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest

from shared.errors import BackendFailed
from shared.payloads import Part, PayloadRef
from tests.support.upstream_fakes import Canned
from tests.unit.worker.backends.calls import (
    binary_answer,
    call,
    failure,
    json_answer,
    make_caller,
    run,
)
from worker.backends.base import data_uri, encode_json
from worker.backends.oip_binary import binary_response, bytes_request, tensor_data


def decoded(reply: Canned) -> Any:
    """The prediction value of an `infer` answered `reply`; it must be storable as strict JSON."""
    caller, upstream, _ = make_caller(lambda _: reply)
    answer = run(caller, call("mls", "infer"))
    assert answer.content_type is None  # JSON, whatever the server's Content-Type said
    encode_json(answer.value)  # no NaN or bytes left: ValueError/TypeError otherwise
    assert len(upstream.sent) == 1
    return answer.value


def output(
    name: str, datatype: str | None, raw: bytes, shape: list[int] | None = None,
    size: Any = None, **parameters: Any,
) -> dict[str, Any]:  # fmt: skip
    """A binary output's header entry; `size`: a binary_data_size other than the raw's."""
    return {
        "name": name,
        "datatype": datatype,
        "shape": shape or [1],
        "parameters": {"binary_data_size": len(raw) if size is None else size, **parameters},
    }


def element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


# --- the request --------------------------------------------------------------------------------


def test_bytes_request_lays_out_header_then_length_prefixed_elements() -> None:
    ref = PayloadRef(parts=(Part(name="a", size=2), Part(name="b", size=3)), multipart=True)
    body, header_length = bytes_request(ref, b"hiabc")
    header = json.loads(body[:header_length])
    assert header == {
        "inputs": [
            {"name": "a", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}},
            {"name": "b", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 7}},
        ]
    }
    assert body[header_length:] == b"\x02\x00\x00\x00hi\x03\x00\x00\x00abc"


def test_a_raw_body_is_the_tensor_input_whatever_its_part_says() -> None:
    ref = PayloadRef(parts=(Part(name="file", size=1),), multipart=False)
    body, header_length = bytes_request(ref, b"\xff")
    assert json.loads(body[:header_length])["inputs"][0]["name"] == "input"
    assert body[header_length:] == b"\x01\x00\x00\x00\xff"


def test_a_request_answers_itself_as_the_extension_reads_it() -> None:
    # The same layout both ways: a server echoing the request's tensors decodes to the parts.
    ref = PayloadRef(parts=(Part(name="t", size=5), Part(name="u", size=2)), multipart=True)
    body, header_length = bytes_request(ref, "héllo".encode()[:5] + b"\xff\xfe")
    header = json.loads(body[:header_length])
    echoed = binary_answer({"outputs": header["inputs"]}, body[header_length:])
    outputs = decoded(echoed)["outputs"]
    assert [o["data"] for o in outputs] == [["héll"], [data_uri(b"\xff\xfe")]]


# --- the answer ---------------------------------------------------------------------------------


def test_binary_outputs_are_decoded_into_json_data() -> None:
    fp32 = struct.pack("<3f", 1.5, -2.0, 0.25)
    int64 = struct.pack("<2q", 2**40, -1)
    strings = element("héllo".encode()) + element(b"") + element(b"\xff\xd8\xff")
    header = {
        "model_name": "iris",
        "id": "r-1",
        "outputs": [
            output("scores", "FP32", fp32, [1, 3]),
            {"name": "json", "datatype": "INT32", "shape": [2], "data": [7, 8]},  # not binary
            output("ids", "INT64", int64, [2]),
            output("labels", "BYTES", strings, [3], content_type="str"),
        ],
    }
    value = decoded(binary_answer(header, fp32, int64, strings))
    assert value == {
        "model_name": "iris",
        "id": "r-1",
        "outputs": [
            {"name": "scores", "datatype": "FP32", "shape": [1, 3], "data": [1.5, -2.0, 0.25]},
            {"name": "json", "datatype": "INT32", "shape": [2], "data": [7, 8]},
            {"name": "ids", "datatype": "INT64", "shape": [2], "data": [2**40, -1]},
            {
                "name": "labels",
                "datatype": "BYTES",
                "shape": [3],
                # Text as text; bytes that are not UTF-8 as a data URI, never mis-decoded.
                "data": ["héllo", "", "data:application/octet-stream;base64,/9j/"],
                "parameters": {"content_type": "str"},  # only binary_data_size goes
            },
        ],
    }


def test_non_finite_floats_travel_as_protobufs_json_spells_them() -> None:
    fp32 = struct.pack("<4f", math.nan, math.inf, -math.inf, 3.0)
    fp64 = struct.pack("<d", -math.nan)
    # BF16 is the upper half of an FP32: 1.0, -2.0, NaN, +Inf.
    bf16 = struct.pack("<4H", 0x3F80, 0xC000, 0x7FC0, 0x7F80)
    fp16 = struct.pack("<2e", 0.5, math.inf)
    raws = [fp32, fp64, bf16, fp16]
    kinds = ["FP32", "FP64", "BF16", "FP16"]
    header = {"outputs": [output(k, k, raw) for k, raw in zip(kinds, raws, strict=True)]}
    outputs = decoded(binary_answer(header, *raws))["outputs"]
    assert [o["data"] for o in outputs] == [
        ["NaN", "Infinity", "-Infinity", 3.0],
        ["NaN"],
        [1.0, -2.0, "NaN", "Infinity"],
        [0.5, "Infinity"],
    ]


@pytest.mark.parametrize(
    ("datatype", "form", "values"),
    [
        ("BOOL", "?", [True, False]),
        ("UINT8", "B", [0, 255]),
        ("UINT16", "H", [65535, 1]),
        ("UINT32", "I", [2**32 - 1, 0]),
        ("UINT64", "Q", [2**64 - 1, 2]),
        ("INT8", "b", [-128, 127]),
        ("INT16", "h", [-32768, 5]),
        ("INT32", "i", [-(2**31), 9]),
        ("INT64", "q", [-(2**63), 2**63 - 1]),
        ("FP64", "d", [0.1, -1e300]),
    ],
)
def test_fixed_size_datatypes_unpack_little_endian(
    datatype: str, form: str, values: list[Any]
) -> None:
    raw = struct.pack(f"<{len(values)}{form}", *values)
    assert tensor_data(datatype, raw) == values
    assert tensor_data(datatype, b"") == []


def test_an_answer_without_the_header_length_is_plain_json() -> None:
    value = {"outputs": [{"name": "p", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    assert decoded(json_answer(200, value)) == value


def test_a_header_length_covering_the_whole_body_is_a_json_answer() -> None:
    value = {"outputs": [{"name": "p", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    assert decoded(binary_answer(value)) == value


# --- malformed answers --------------------------------------------------------------------------

SECRET = b"s3cret-payload-bytes"  # what the tails carry: never in a message
FP32_ONE = struct.pack("<f", 1.0)


def header_of(*outputs: Any) -> dict[str, Any]:
    return {"outputs": list(outputs)}


def one(datatype: str | None, raw: bytes, size: Any = None) -> Canned:
    """An answer of one binary output `raw` of `datatype`."""
    return binary_answer(header_of(output("p", datatype, raw, size=size)), raw)


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (binary_answer(header_of(), SECRET, length="lots"), "invalid literal"),
        (binary_answer(header_of(), SECRET, length="0"), "does not fit"),
        (binary_answer(header_of(), SECRET, length="-4"), "does not fit"),
        (binary_answer(header_of(), SECRET, length="99999"), "does not fit"),
        (binary_answer(header_of(), SECRET, length="5"), "Unterminated"),  # cut inside the JSON
        (binary_answer([1, 2], SECRET), "not an inference response"),  # type: ignore[arg-type]
        (binary_answer({"outputs": 5}, SECRET), "outputs are not a list"),
        (binary_answer({"outputs": True}), "outputs are not a list"),
        (one("FP32", SECRET, size=len(SECRET) + 1), "past the body"),
        (one("FP32", FP32_ONE, size=True), "past the body"),  # JSON's true is no size
        (one("FP32", FP32_ONE, size="4"), "past the body"),
        (one("FP32", FP32_ONE, size=-1), "past the body"),
        (one("FP32", FP32_ONE, size=4.0), "past the body"),
        (binary_answer(header_of(output("p", "FP32", FP32_ONE)), FP32_ONE, SECRET), "bytes after"),
        (one("FP32", SECRET + b"!"), "not a whole number of 4-byte elements"),
        (one("BF16", b"abc"), "2-byte"),
        (one("FP8", SECRET), "unknown datatype 'FP8'"),
        (one(None, SECRET), "unknown datatype"),
        (one("BYTES", b"\x01\x00"), "length is cut off"),
        (one("BYTES", element(SECRET)[:-1]), "element is cut off"),
    ],
)
def test_a_malformed_binary_answer_is_backend_failed_without_its_bytes(
    reply: Canned, reason: str
) -> None:
    caller, upstream, sleeps = make_caller(lambda _: reply)
    error = failure(caller, call("kserve", "infer"))
    assert isinstance(error, BackendFailed)
    assert (error.status, error.code, error.retryable) == (502, "backend_error", False)
    assert "backend 'kserve' (oip)" in error.msg
    assert "binary inference response that does not parse" in error.msg
    assert reason in error.msg
    assert "s3cret" not in error.msg
    assert error.__cause__ is None  # no chained traceback that could show the bytes
    assert error.__suppress_context__
    assert (len(upstream.sent), sleeps) == (1, [])  # the same answer again would not help


def test_binary_response_leaves_json_outputs_among_binary_ones_alone() -> None:
    header = encode_json(
        {"outputs": [{"name": "a", "data": [1], "parameters": {"x": 1}}, "odd", None]}
    )
    assert binary_response(header, len(header)) == {
        "outputs": [{"name": "a", "data": [1], "parameters": {"x": 1}}, "odd", None]
    }
