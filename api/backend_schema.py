"""The backend rules of POST /dispatch_model as JSON Schema, for the OpenAPI document.

The document is built from this server's settings (api/openapi.py), so it names the backends
this server has: `backend` is one of them, `operation` one of its protocol's, and the body is
what that protocol takes (api/backend_inputs.py, whose `input_schema` each branch uses). A
request the document calls valid is one resolve_target and check_backend_input accept, and the
other way round (tests/unit/api/test_backend_inputs.py; tests/security/test_fuzz.py against the
running server), with one rule no schema can state: bytes to an OIP backend need its server to
take the binary tensor data extension, which only the server can say (api/backend_probe.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from api.backend_inputs import STREAMING_OPERATIONS, input_schema, takes_bytes
from shared.backends import Backend, Protocol
from shared.settings import Settings

NULL = {"type": "null"}
SET = {"not": NULL}
# An operation that answers whole: `stream: true` is refused (api/backend_inputs.py check_stream).
NOT_STREAMED = {"not": {"required": ["stream"], "properties": {"stream": {"const": True}}}}
# What the other protocols leave to TorchServe: its targets are TorchServe's own.
_TORCHSERVE_ONLY = ("host", "port", "http_protocol", "token", "username", "password")


def _chosen(name: str, value: str, default: bool, form: bool) -> dict[str, Any]:
    """`name` is `value`, or (the default) absent, or null in JSON."""
    if not default:
        return {"required": [name], "properties": {name: {"const": value}}}
    if form:  # a form has no nulls: absent or the value
        return {"properties": {name: {"const": value}}}
    return {"properties": {name: {"anyOf": [{"const": value}, NULL]}}}


def _byte_operations(backend: Backend) -> list[str]:
    return [op for op in backend.operations if takes_bytes(backend.protocol, op)]


def bytes_backends(settings: Settings) -> list[Backend]:
    """The backends a raw body or multipart file parts may go to."""
    return [b for b in settings.backend_map.values() if _byte_operations(b)]


def _json_operation(backend: Backend, operation: str) -> dict[str, Any]:
    chosen = _chosen("operation", operation, operation == backend.default_operation, form=False)
    if (backend.protocol, operation) not in STREAMING_OPERATIONS:
        chosen = {"allOf": [chosen, NOT_STREAMED]}
    schema = input_schema(backend.protocol, operation)
    if schema is None:  # TorchServe: any input, any bytes
        return chosen
    body: dict[str, Any] = {"required": ["input"], "properties": {"input": schema, "data": NULL}}
    if takes_bytes(backend.protocol, operation):
        body = {"anyOf": [body, {"required": ["data"], "properties": {"data": SET}}]}
    return {"allOf": [chosen, body]}


def _json_backend(backend: Backend, default: bool) -> dict[str, Any]:
    chosen = _chosen("backend", backend.name, default, form=False)
    branch: dict[str, Any] = {
        **chosen,
        "anyOf": [_json_operation(backend, op) for op in backend.operations],
    }
    if backend.protocol is not Protocol.torchserve:
        branch["properties"] = {**branch["properties"], **dict.fromkeys(_TORCHSERVE_ONLY, NULL)}
    if backend.protocol is Protocol.openai:  # its API has no model versions
        branch["properties"]["model_version"] = NULL
    return branch


def json_rules(settings: Settings) -> dict[str, Any]:
    """PredictionRequest (a JSON dispatch, a batch item): one branch per backend."""
    return {
        "anyOf": [
            _json_backend(b, b.name == settings.default_backend)
            for b in settings.backend_map.values()
        ]
    }


def form_rules(settings: Settings) -> dict[str, Any]:
    """The multipart form: a backend that takes bytes, with an operation that does."""
    branches = []
    for backend in bytes_backends(settings):
        chosen = _chosen("backend", backend.name, backend.name == settings.default_backend, True)
        operations = _byte_operations(backend)
        branch: dict[str, Any] = {
            "properties": {**chosen["properties"], "operation": {"enum": operations}}
        }
        required = [
            *chosen.get("required", []),
            *([] if backend.default_operation in operations else ["operation"]),
        ]
        if required:
            branch["required"] = required
        branches.append(branch)
    return {"anyOf": branches}


def _names(values: Iterable[str]) -> list[str]:
    return sorted(set(values))


def backend_field(settings: Settings, *, form: bool) -> dict[str, Any]:
    """`backend`: a configured one (in a form or query string: one that takes bytes)."""
    names = [b.name for b in bytes_backends(settings)] if form else list(settings.backend_map)
    return {"type": "string", "enum": _names(names)}


def operation_field(settings: Settings, *, form: bool) -> dict[str, Any]:
    """`operation`: one of a configured backend's (in a form: one that takes bytes)."""
    backends = bytes_backends(settings) if form else settings.backend_map.values()
    found = [op for b in backends for op in (_byte_operations(b) if form else b.operations)]
    return {"type": "string", "enum": _names(found)}
