"""A request's body checked against its backend's protocol, before anything is queued.

A body the model server cannot take would only fail later, on a worker, after a queue wait and a
call: here it is a 422 at once that names the field and says what to send, and nothing is
written to Redis. TorchServe takes any JSON value and any bytes, so its requests pass untouched
(the hot path pays one comparison). The rules, per protocol and operation:

- OIP `infer`: `input` is an inference request, `{"inputs": [tensor, ...], "parameters"?,
  "outputs"?, "id"?}`, each tensor `{"name", "shape", "datatype", "data", "parameters"?}`; or
  bytes (a raw body, multipart file parts, a data URI), on a server that takes the binary tensor
  data extension (api/backend_probe.py asks it). `generate`: `input` is a JSON object.
- OpenAI `chat.completions`: `{"messages": [{"role": ...}, ...], ...}`; `completions`:
  `{"prompt": ...}`; `embeddings`: `{"input": ...}`. JSON only, never bytes. `input.stream: true`
  is a 422 that points to the request's own `stream` field: the dispatcher, not the client,
  sets the body's `stream` (from that field), since it must read the answer as a stream.
- `stream: true` (the request's field, issue 18) needs an operation that can stream
  (`STREAMING_OPERATIONS`); asking it of one that cannot (embeddings) is a 422.
- Every protocol but TorchServe needs `input` (or bytes, for OIP): the original proxy's fields
  that stand in for it (`max_model_page`...) build a body only TorchServe understands.

`request_schemas` gives the same rules as JSON Schema, for the OpenAPI document
(api/backend_schema.py); tests/unit/api/test_backend_inputs.py holds the two to one verdict.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from shared.backends import Protocol, Target
from shared.errors import InvalidRequest, UnsupportedOperation
from shared.models import PredictionRequest

# The tensor datatypes of the Open Inference Protocol (KServe's v2 spec), plus Triton's BF16.
OIP_DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES", "BF16",
)  # fmt: skip
_DATATYPES = frozenset(OIP_DATATYPES)
INPUT_STREAM_REFUSED = (
    'input.stream: set the request\'s own stream field instead ("stream": true next to '
    "input, a form field or ?stream=true); the dispatcher sets the backend's"
)
# The operations whose answer can arrive in parts: TorchServe's intermediate responses, OIP's
# infer_stream/generate_stream, OpenAI's SSE chunks. Embeddings come whole.
STREAMING_OPERATIONS = frozenset(
    {
        (Protocol.torchserve, "predictions"),
        (Protocol.oip, "infer"),
        (Protocol.oip, "generate"),
        (Protocol.openai, "chat.completions"),
        (Protocol.openai, "completions"),
    }
)
# What each operation's body looks like, for the messages.
_SHAPES = {
    (Protocol.oip, "infer"): '{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", '
    '"data": [1, 2, 3]}]}',
    (Protocol.oip, "generate"): '{"text_input": "...", "parameters": {...}}',
    (Protocol.openai, "chat.completions"): '{"messages": [{"role": "user", "content": "..."}]}',
    (Protocol.openai, "completions"): '{"prompt": "...", "max_tokens": 16}',
    (Protocol.openai, "embeddings"): '{"input": "..."}',
}

# Whether a backend takes bytes (OIP: its server's answer); raises for one that does not.
BytesCheck = Callable[[Target], Awaitable[None]]


async def check_backend_input(
    request: PredictionRequest, target: Target, has_bytes: bool, takes_bytes: BytesCheck
) -> None:
    """422 unless the body (or the bytes) fits the target's protocol and operation.

    Callers skip TorchServe targets themselves; this checks them as passing too."""
    if target.protocol is Protocol.torchserve:
        return
    check_body(request, target, has_bytes)
    if has_bytes:
        await takes_bytes(target)


def check_stream(target: Target) -> None:
    """422 unless the target's operation can stream (asked with `stream: true`)."""
    if (target.protocol, target.operation) not in STREAMING_OPERATIONS:
        raise UnsupportedOperation(
            f"stream: {target.operation} of backend {target.backend!r} "
            f"({target.protocol.value}) answers whole and cannot stream; leave stream out"
        )


def check_body(request: PredictionRequest, target: Target, has_bytes: bool) -> None:
    """The synchronous rules: everything but whether an OIP server takes bytes."""
    protocol, operation = target.protocol, target.operation
    if protocol is Protocol.torchserve:
        return
    shown = f"backend {target.backend!r} ({protocol.value})"
    if has_bytes:
        if protocol is Protocol.openai:
            raise UnsupportedOperation(
                f"data: {shown} takes JSON, not bytes (a raw body, a multipart file or a data "
                f"URI); send its {operation} request body as input, e.g. "
                f"{_SHAPES[(protocol, operation)]}"
            )
        if operation != "infer":
            raise UnsupportedOperation(
                f"data: bytes go to {shown} with operation infer (as a BYTES tensor), not "
                f"{operation}; send its {operation} body as input"
            )
        return
    body = request.input
    if body is None:
        raise InvalidRequest(
            f"input: required with {shown}: its {operation} request body, e.g. "
            f"{_SHAPES[(protocol, operation)]}"
        )
    if not isinstance(body, dict):
        raise InvalidRequest(
            f"input: {shown} takes a JSON object as its {operation} request body, e.g. "
            f"{_SHAPES[(protocol, operation)]}"
        )
    if protocol is Protocol.oip:
        if operation == "infer":
            _oip_infer(body)
        return
    _openai(body, operation)


# --- the Open Inference Protocol ---------------------------------------------------------------


def _oip_infer(body: dict[str, Any]) -> None:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest(
            "input.inputs: an OIP inference request needs a non-empty list of input tensors, "
            f"e.g. {_SHAPES[(Protocol.oip, 'infer')]}"
        )
    for index, tensor in enumerate(inputs):
        _tensor(tensor, f"input.inputs[{index}]")
    if "parameters" in body and not isinstance(body["parameters"], dict):
        raise InvalidRequest("input.parameters: must be a JSON object of request parameters")
    if "id" in body and not isinstance(body["id"], str):
        raise InvalidRequest("input.id: must be a string (the request's id)")
    if "outputs" in body:
        outputs = body["outputs"]
        if not isinstance(outputs, list):
            raise InvalidRequest(
                'input.outputs: a list of requested outputs, e.g. [{"name": "y"}]; or leave it '
                "out for every output"
            )
        for index, output in enumerate(outputs):
            where = f"input.outputs[{index}]"
            if not isinstance(output, dict) or not _text(output.get("name")):
                raise InvalidRequest(f'{where}: an object with the output\'s name, {{"name": "y"}}')
            _parameters(output, where)


def _tensor(tensor: object, where: str) -> None:
    if not isinstance(tensor, dict):
        raise InvalidRequest(
            f'{where}: a tensor object, {{"name", "shape", "datatype", "data"}}, e.g. '
            '{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}'
        )
    if not _text(tensor.get("name")):
        raise InvalidRequest(f"{where}.name: required, the model input's name (a string)")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(_dimension(d) for d in shape):
        raise InvalidRequest(
            f"{where}.shape: required, a list of non-negative integers, e.g. [1, 3]"
        )
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in _DATATYPES:
        shown = json.dumps(datatype)[:40] if "datatype" in tensor else "missing"
        raise InvalidRequest(f"{where}.datatype: {shown}; use one of {', '.join(OIP_DATATYPES)}")
    if "data" not in tensor:
        raise InvalidRequest(
            f"{where}.data: required, the tensor's values (a flat or nested list; strings for "
            "BYTES); send bytes as a raw body, a multipart file or a data URI instead"
        )
    _parameters(tensor, where)


def _parameters(holder: dict[str, Any], where: str) -> None:
    if "parameters" in holder and not isinstance(holder["parameters"], dict):
        raise InvalidRequest(f"{where}.parameters: must be a JSON object")


def _text(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _dimension(value: object) -> bool:
    """A JSON integer >= 0 (JSON Schema's `integer`: 3.0 is one too; true is not)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, float) and value.is_integer() and value >= 0


# --- OpenAI-compatible servers -----------------------------------------------------------------


def _openai(body: dict[str, Any], operation: str) -> None:
    if body.get("stream") is True:
        raise UnsupportedOperation(INPUT_STREAM_REFUSED)
    if operation == "chat.completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest(
                "input.messages: chat.completions needs a non-empty list of messages, e.g. "
                f"{_SHAPES[(Protocol.openai, operation)]}"
            )
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequest(
                    f"input.messages[{index}]: an object with a role (system, user, assistant, "
                    'tool...) and its content, e.g. {"role": "user", "content": "..."}'
                )
    elif operation == "completions" and "prompt" not in body:
        raise InvalidRequest(
            "input.prompt: required by completions, the text (or texts) to complete, e.g. "
            f"{_SHAPES[(Protocol.openai, operation)]}"
        )
    elif operation == "embeddings" and "input" not in body:
        raise InvalidRequest(
            "input.input: required by embeddings, the text (or texts) to embed, e.g. "
            f"{_SHAPES[(Protocol.openai, operation)]}"
        )


# --- the same rules as JSON Schema --------------------------------------------------------------

_OBJECT = {"type": "object"}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype", "data"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": list(OIP_DATATYPES)},
        "parameters": _OBJECT,
    },
}
_OIP_INFER = {
    "type": "object",
    "description": "An Open Inference Protocol inference request.",
    "required": ["inputs"],
    "properties": {
        "inputs": {"type": "array", "minItems": 1, "items": _TENSOR},
        "parameters": _OBJECT,
        "id": {"type": "string"},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string", "minLength": 1}, "parameters": _OBJECT},
            },
        },
    },
}
# `input.stream: true` is refused (the request's `stream` asks for it); any other value (false,
# absent) is the server's to judge.
_NOT_STREAMING = {"not": {"required": ["stream"], "properties": {"stream": {"const": True}}}}
_OPENAI: dict[str, dict[str, Any]] = {
    "chat.completions": {
        "required": ["messages"],
        "properties": {
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["role"],
                    "properties": {"role": {"type": "string"}},
                },
            }
        },
    },
    "completions": {"required": ["prompt"]},
    "embeddings": {"required": ["input"]},
}


def input_schema(protocol: Protocol, operation: str) -> dict[str, Any] | None:
    """The JSON Schema of `input` for a protocol's operation; None: anything (TorchServe)."""
    if protocol is Protocol.torchserve:
        return None
    if protocol is Protocol.oip:
        return _OIP_INFER if operation == "infer" else {**_OBJECT, "description": "A JSON object."}
    return {
        "type": "object",
        "description": f"An OpenAI {operation} request body (`model` is set from model_name).",
        **_OPENAI[operation],
        "allOf": [_NOT_STREAMING],
    }


def takes_bytes(protocol: Protocol, operation: str) -> bool:
    """Whether the protocol's operation may take bytes at all (OIP: if its server does too)."""
    return protocol is Protocol.torchserve or (protocol is Protocol.oip and operation == "infer")
