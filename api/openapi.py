"""The OpenAPI document: what FastAPI generates from the routes, plus what only this module says.

FastAPI documents what a route declares. What it cannot see is written here, once:

- the bodies two routes read themselves (POST /dispatch_model's four forms, api/inputs.py;
  POST /batches' JSON and JSONL, api/batch_inputs.py), and the headers and query parameters
  they read from the request;
- the limits the server's settings set (DISPATCH_MAX_TIMEOUT, BATCH_MAX_REQUESTS), so the
  schema served is the one this server enforces;
- the API-key security schemes, and which operations need a key.

Models a body refers to are put in `components/schemas` with the rest, so every `$ref` of the
document resolves in it (tests/unit/api/test_openapi.py). api/docs.py serves the document.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api import idempotency
from api.backend_schema import backend_field, form_rules, json_rules, operation_field
from api.batch_inputs import ALL_EVENTS, JSONL_TYPES, MAX_CUSTOM_ID, TASK_EVENTS
from api.host_pattern import HOST_PATTERN
from api.inputs import DATA_URI_PATTERN, END, MEDIA_TYPE_PATTERN, UNTYPED_DATA_URI_PATTERN
from shared.models import OUTPUT_WEBHOOK_EVENT as OUTPUT_EVENT
from shared.models import PredictionRequest, TaskError
from shared.settings import Settings

REF = "#/components/schemas/"

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": TaskError, "description": description}
    for status, description in {
        400: "malformed Idempotency-Key header",
        401: "API key missing or invalid",
        403: "TorchServe target or webhook URL not on the allow-list",
        404: "unknown model or version (or task)",
        409: "the task or batch is not in a state that allows it",
        413: "body over MAX_BODY_BYTES",
        415: "a body of a Content-Type the route does not read",
        422: "invalid request, Idempotency-Key reused for another request, or the model "
        "rejected the input",
        429: "queue full: retry after Retry-After seconds",
        502: "the model server (backend) failed or refused its token",
        503: "the model server or the queue unavailable",
        504: "timed out or expired",
    }.items()
}

# Endpoints that never need a key (api/deps.py: every other route depends on the owner).
PUBLIC_PATHS = frozenset({"/health"})
SECURITY_SCHEMES: dict[str, Any] = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <key>`: one of the server's DISPATCHER_API_KEYS.",
    },
    "apiKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "`X-API-Key: <key>`: the same keys, for clients that cannot set Bearer.",
    },
}


_RAW_TYPES = (
    "application/octet-stream",
    "image/*",
    "audio/*",
    "video/*",
    "application/pdf",
    "text/plain",
)
_FORM_FIELDS = (
    "model_name",
    "model_version",
    "backend",
    "operation",
    "timeout",
    "priority",
    "stream",
    "input_media_type",
    "webhook",
    "webhook_events",
)
_BINARY = {"type": "string", "format": "binary"}


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """`app.openapi()` (FastAPI's hook for a custom schema) builds this document, once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes
    )
    components: dict[str, Any] = schema.setdefault("components", {}).setdefault("schemas", {})
    _add_component(components, "PredictionRequest", _prediction_request(settings))
    paths = schema["paths"]
    _merge(paths["/dispatch_model"]["post"], _dispatch_extra(settings))
    _merge(paths["/batches"]["post"], _batch_extra(settings))
    return with_security(schema, keyed=bool(settings.dispatcher_api_keys))


def with_security(schema: dict[str, Any], keyed: bool) -> dict[str, Any]:
    """The schema with both API-key schemes, each accepted by every endpoint but /health.

    Without keys configured, `{}` (no credentials) is one of the alternatives too.
    """
    schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    either: list[dict[str, list[str]]] = [{name: []} for name in SECURITY_SCHEMES]
    if not keyed:
        either.insert(0, {})
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            operation["security"] = [] if path in PUBLIC_PATHS else either
    return schema


def _merge(operation: dict[str, Any], extra: dict[str, Any]) -> None:
    """What the route declares, then what it reads itself (as FastAPI merges `openapi_extra`)."""
    operation["parameters"] = [*operation.get("parameters", []), *extra.pop("parameters", [])]
    operation.update(extra)


def _add_component(components: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    """`schema` and the models it refers to (its `$defs`) as components of their own."""
    for defined, definition in {**schema.pop("$defs", {}), name: schema}.items():
        held = components.setdefault(defined, definition)
        if held != definition:  # two models of one name: one of the `$ref`s would lie
            raise ValueError(f"components/schemas/{defined}: two different schemas")


def _prediction_request(settings: Settings) -> dict[str, Any]:
    """PredictionRequest as the server checks it: the model's schema plus the rules of
    api/inputs.py and api/webhook_targets.py that span fields."""
    schema = PredictionRequest.model_json_schema(ref_template=REF + "{model}")
    properties = schema["properties"]
    _branch(properties["timeout"], "number")["maximum"] = settings.dispatch_max_timeout
    _branch(properties["data"], "string")["pattern"] = DATA_URI_PATTERN
    _branch(properties["host"], "string")["pattern"] = HOST_PATTERN
    # The backends this server has, and their operations (api/backend_schema.py).
    properties["backend"]["anyOf"] = [backend_field(settings, form=False), _NULL]
    properties["operation"]["anyOf"] = [operation_field(settings, form=False), _NULL]
    schema["allOf"] = [
        # `input` or `data`, never both (a null is no value).
        {"not": {"required": ["input", "data"], "properties": {"input": _SET, "data": _SET}}},
        # `webhook_events` only with a `webhook`.
        {
            "anyOf": [
                {"properties": {"webhook_events": _NULL}},
                {"required": ["webhook"], "properties": {"webhook": _SET}},
            ]
        },
        # Bytes whose data URI names no media type take `input_media_type`'s: then a media type.
        {
            "anyOf": [
                {"properties": {"input_media_type": _NULL}},
                {"properties": {"input_media_type": _MEDIA_TYPE}},
                {
                    "not": {
                        "required": ["data"],
                        "properties": {
                            "data": {"type": "string", "pattern": UNTYPED_DATA_URI_PATTERN}
                        },
                    }
                },
            ]
        },
        # `task.output` only for a streamed task (shared/models.py).
        {
            "anyOf": [
                {
                    "properties": {
                        "webhook_events": {
                            "anyOf": [_NULL, {"not": {"contains": {"const": OUTPUT_EVENT}}}]
                        }
                    }
                },
                _STREAMED,
            ]
        },
        # Per backend: its operations, and the body its protocol takes.
        json_rules(settings),
    ]
    return schema


_NULL = {"type": "null"}
_SET = {"not": _NULL}
_STREAMED = {"required": ["stream"], "properties": {"stream": {"const": True}}}
_EVENTS_NOTE = f"; only with webhook ({OUTPUT_EVENT}: with stream=true)."
_MEDIA_TYPE = {"type": "string", "pattern": MEDIA_TYPE_PATTERN}


def _branch(field: dict[str, Any], kind: str) -> dict[str, Any]:
    """The `kind` alternative of an optional field's `anyOf` (the other is null)."""
    branch: dict[str, Any] = next(b for b in field["anyOf"] if b.get("type") == kind)
    return branch


def _form_field(name: str, field: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """A request field as a form or query value: text, and absent rather than null."""
    if name == "webhook_events":
        return {
            "type": "string",
            "pattern": _comma_separated(TASK_EVENTS),
            "description": "Comma-separated: " + ", ".join(sorted(TASK_EVENTS)) + "; "
            f"{OUTPUT_EVENT} only with stream=true.",
        }
    kept = [b for b in field.get("anyOf", [field]) if b.get("type") != "null"]
    value = {**{k: v for k, v in field.items() if k not in ("anyOf", "default")}, **kept[0]}
    if name == "timeout":
        value["maximum"] = settings.dispatch_max_timeout
    if name == "backend":  # bytes: a backend that takes them (an OIP one: if its server does)
        value.update(backend_field(settings, form=True))
        value.pop("examples", None)
    if name == "operation":
        value.update(operation_field(settings, form=True))
    return value


def _comma_separated(names: Iterable[str]) -> str:
    """A list as api/inputs.py and api/batch_inputs.py split it: by commas, blanks dropped."""
    one = "(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")"
    return rf"^[\s,]*{one}(?:\s*,[\s,]*{one})*[\s,]*{END}"


def idempotency_parameter(description: str) -> dict[str, Any]:
    return {
        "name": idempotency.HEADER,
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": idempotency.KEY_PATTERN},
        "description": description,
    }


def _dispatch_extra(settings: Settings) -> dict[str, Any]:
    """The four forms of POST /dispatch_model (api/inputs.py reads the body itself).

    A raw body's request fields are in the query string, and only a raw body's: OpenAPI cannot
    tie a parameter to a media type, so the descriptions say it (tests/security/fuzz_hooks.py
    holds the fuzzer to it).
    """
    fields = PredictionRequest.model_json_schema(ref_template=REF + "{model}")["properties"]
    form_fields = {name: _form_field(name, fields[name], settings) for name in _FORM_FIELDS}
    multipart = {
        "type": "object",
        "required": ["model_name", "data"],
        "properties": {
            **form_fields,
            # Every part without a Content-Type of its own is sent as this one.
            "input_media_type": {**form_fields["input_media_type"], **_MEDIA_TYPE},
            "data": {
                **_BINARY,
                "description": "The payload; more file parts (any names) are forwarded too.",
            },
        },
        "dependentRequired": {"webhook_events": ["webhook"]},  # a form has no nulls
        # A backend that takes bytes, an operation that does. (`task.output` only with
        # `stream`, as in JSON, is in the field's description: a `not` beside the binary part
        # crashes Schemathesis 4.32.5's coverage phase, so tests/security/fuzz_hooks.py holds it.)
        "allOf": [form_rules(settings)],
    }
    raw = {**_BINARY, "description": "The payload as it is; the fields go in the query string."}
    query = [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": form_fields[name],
            "description": "Raw-body form only (any Content-Type other than JSON or multipart)"
            + ("; required there." if name == "model_name" else "")
            + (
                "; only with webhook (task.output: with stream=true)."
                if name == "webhook_events"
                else ""
            )
            + ("; an operation of that backend." if name == "operation" else "")
            + ("" if name in ("webhook_events", "operation") else "."),
        }
        for name in _FORM_FIELDS
    ]
    key = idempotency_parameter(
        "Retry safely: the same key and request answer with the same task "
        "(`Idempotent-Replayed: true`), never a second run; another request with it is 422."
    )
    return {
        "parameters": [key, *query],
        "requestBody": {
            "required": True,
            "description": "JSON (`input`, or `data` as a data URI), multipart/form-data with "
            "file parts, or a raw body of any other Content-Type (fields in the query string).",
            "content": {
                "application/json": {"schema": {"$ref": REF + "PredictionRequest"}},
                "multipart/form-data": {"schema": multipart},
                **{media: {"schema": raw} for media in _RAW_TYPES},
            },
        },
    }


def _batch_extra(settings: Settings) -> dict[str, Any]:
    """POST /batches' JSON and JSONL forms (api/batch_inputs.py reads the body itself)."""
    own = {"custom_id": {"type": "string", "minLength": 1, "maxLength": MAX_CUSTOM_ID}}
    item = {
        "allOf": [
            {"$ref": REF + "PredictionRequest"},
            {"type": "object", "required": ["custom_id"], "properties": own},
        ],
        "description": "A JSON dispatch (priority default: batch) plus custom_id, unique in "
        "the batch.",
    }
    events = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "string", "enum": sorted(ALL_EVENTS)},
        "description": "batch.completed (the default) and task.* events, which every item "
        "then sends",
    }
    return {
        "parameters": [
            idempotency_parameter(
                "Retry safely: the same key and body answer with the same batch."
            ),
            {
                "name": "webhook",
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": "JSONL form only: the batch's webhook.",
            },
            {
                "name": "webhook_events",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "pattern": _comma_separated(ALL_EVENTS)},
                "description": "JSONL form only: the batch's webhook_events, comma-separated; "
                "only with webhook.",
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["requests"],
                        "properties": {
                            "requests": {
                                "type": "array",
                                "items": item,
                                "minItems": 1,
                                "maxItems": settings.batch_max_requests,
                            },
                            "webhook": {"anyOf": [{"type": "string"}, _NULL]},
                            "webhook_events": {"anyOf": [events, _NULL]},
                        },
                        "anyOf": [
                            {"properties": {"webhook_events": _NULL}},
                            {"required": ["webhook"], "properties": {"webhook": _SET}},
                        ],
                    }
                },
                **{media: {"schema": {"type": "string"}} for media in JSONL_TYPES[:2]},
            },
        },
    }
