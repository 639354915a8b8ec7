"""The Open Inference Protocol's binary tensor data extension, both ways.

A request whose payload is bytes (an image, audio, a document) sends each as a BYTES tensor of
shape [1] in binary: the JSON inference request, then the tensors' bytes back to back, with
`Inference-Header-Content-Length` giving the JSON's length. As the extension defines BYTES in
binary, each element is its length (4 bytes, unsigned, little-endian) followed by its bytes, so
a tensor's `binary_data_size` is 4 more than the payload's. The tensor's name is the multipart
part's field name, or `input` for a raw body or a data URI.

An answer with binary outputs (a server sends them when the request asked, or by default for
some models) is turned back into a plain inference response: each binary output gets its
`data`, numbers unpacked little-endian, BYTES decoded as UTF-8 where they are text and as data
URIs where they are not; so prediction_value is JSON whatever the server chose.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from shared import fastjson
from shared.payloads import PayloadRef
from worker.backends.base import data_uri, encode_json

HEADER_LENGTH = "Inference-Header-Content-Length"
RAW_TENSOR_NAME = "input"
_LENGTH = struct.Struct("<I")
# struct's formats of the fixed-size datatypes (the extension's sizes are the native ones).
FORMATS = {
    "BOOL": "?",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}
# JSON has no NaN or infinities: they travel as protobuf's JSON mapping spells them.
_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def bytes_request(ref: PayloadRef, data: bytes) -> tuple[bytes, int]:
    """The body of an inference request carrying the payload's parts as BYTES tensors, and
    the length of its JSON header."""
    inputs: list[dict[str, Any]] = []
    tails: list[bytes | memoryview] = []
    view = memoryview(data)
    offset = 0
    for part in ref.parts:
        chunk = view[offset : offset + part.size]
        offset += part.size
        name = (part.name if ref.multipart else None) or RAW_TENSOR_NAME
        inputs.append(
            {
                "name": name,
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": _LENGTH.size + len(chunk)},
            }
        )
        tails += [_LENGTH.pack(len(chunk)), chunk]
    header = encode_json({"inputs": inputs})
    return b"".join([header, *tails]), len(header)


def binary_response(content: bytes, header_length: int) -> dict[str, Any]:
    """The inference response of a body with binary outputs, every output's `data` in JSON.
    ValueError when the body is not what its header says."""
    if not 0 < header_length <= len(content):
        raise ValueError(f"{HEADER_LENGTH} {header_length} does not fit a {len(content)}-byte body")
    response = fastjson.loads(content[:header_length])
    if not isinstance(response, dict):
        raise ValueError("the header is not an inference response (a JSON object)")
    outputs = response.get("outputs") or []
    if not isinstance(outputs, list):  # iterated as it is, a number would raise TypeError
        raise ValueError("the response's outputs are not a list")
    offset = header_length
    for output in outputs:
        parameters = output.get("parameters") if isinstance(output, dict) else None
        if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
            continue  # a JSON output among binary ones
        size = parameters.pop("binary_data_size")
        # JSON's true is an int to Python: it is no size.
        bad = not isinstance(size, int) or isinstance(size, bool) or size < 0
        if bad or offset + size > len(content):
            raise ValueError(f"output {output.get('name')!r}: binary_data_size past the body")
        output["data"] = tensor_data(str(output.get("datatype")), content[offset : offset + size])
        offset += size
        if not parameters:
            del output["parameters"]
    if offset != len(content):
        raise ValueError(f"{len(content) - offset} bytes after the last binary output")
    return response


def tensor_data(datatype: str, raw: bytes) -> list[Any]:
    """A binary tensor's elements, flat in row-major order as OIP's JSON `data` holds them."""
    if datatype == "BYTES":
        return _bytes_elements(raw)
    if datatype == "BF16":  # the upper half of an FP32
        halves = _unpack("H", 2, raw)
        return [_finite(struct.unpack("<f", struct.pack("<I", h << 16))[0]) for h in halves]
    form = FORMATS.get(datatype)
    if form is None:
        raise ValueError(f"binary output of unknown datatype {datatype[:32]!r}")
    values = _unpack(form, struct.calcsize(form), raw)
    return [_finite(v) for v in values] if datatype.startswith("FP") else values


def _unpack(form: str, size: int, raw: bytes) -> list[Any]:
    if len(raw) % size:
        raise ValueError(f"{len(raw)} bytes are not a whole number of {size}-byte elements")
    return list(struct.unpack(f"<{len(raw) // size}{form}", raw))


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else _NON_FINITE[str(value)]


def _bytes_elements(raw: bytes) -> list[str]:
    elements: list[str] = []
    offset = 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise ValueError("a BYTES element's length is cut off")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise ValueError("a BYTES element is cut off")
        element = raw[offset : offset + length]
        offset += length
        try:
            elements.append(element.decode("utf-8"))
        except UnicodeDecodeError:
            elements.append(data_uri(element))
    return elements
