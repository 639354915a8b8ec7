"""Schemathesis hooks of tests/security/test_fuzz.py (`SCHEMATHESIS_HOOKS`): the rules OpenAPI
cannot state, held in the generated requests instead of silencing a check.

OpenAPI cannot tie a query parameter to the body's media type. Two operations read request fields
from the query string for one form only, and their descriptions say so (api/openapi.py):

- POST /dispatch_model: a raw body (any Content-Type but JSON and multipart) takes its fields
  from the query, `model_name` required there, `webhook_events` only with `webhook` (its
  `task.output` only with `stream=true`, in a multipart form too: see api/openapi.py), and
  `operation` one of the `backend`'s that takes bytes (and streams, with `stream=true`); a JSON
  or multipart request takes none from it.
- POST /batches: a JSONL body takes the batch's `webhook` and `webhook_events` from the query,
  `webhook_events` only with `webhook`; a JSON body takes neither.

JSON Schema cannot say "unique by one property" either: a batch's items need distinct
`custom_id`s, which the document says in words.

A case that breaks these is not a request the document describes: a query field beside a JSON
body is ignored (so "invalid data accepted" would be a false finding), a raw body without
`?model_name=` or with a `custom_id` twice is a 422 the description announces. Such cases are
dropped; every other case,
positive or negative, is sent and checked.
"""

from __future__ import annotations

import uuid
from typing import Any

import schemathesis

DISPATCH_QUERY_FIELDS = frozenset(
    {"model_name", "model_version", "backend", "operation", "timeout", "priority", "stream",
     "input_media_type", "webhook", "webhook_events"}
)  # fmt: skip
# The backends test_fuzz.py configures (BACKENDS), on a port nothing listens on: requests for
# them are queued (or refused) as for any server; none is ever answered. The OIP one takes bytes
# (its metadata cannot be read: the benefit of the doubt, api/backend_probe.py).
FUZZ_BACKENDS = {
    "fuzz-oip": {"url": "http://127.0.0.1:9", "protocol": "oip"},
    "fuzz-llm": {"url": "http://127.0.0.1:9/v1", "protocol": "openai"},
}
# Which operations a raw body may name per backend (the query's parameters are each valid on
# their own; OpenAPI cannot tie one to another), and which of them stream (`stream=true`, the
# field's description: api/backend_inputs.py STREAMING_OPERATIONS). None: the default.
RAW_OPERATIONS = {
    None: {None, "predictions", "explanations"},
    "torchserve": {None, "predictions", "explanations"},
    "fuzz-oip": {None, "infer"},
}
RAW_STREAMING = {
    None: {None, "predictions"},
    "torchserve": {None, "predictions"},
    "fuzz-oip": {None, "infer"},
}
BATCH_QUERY_FIELDS = frozenset({"webhook", "webhook_events"})
BODY_FORMS = ("application/json", "multipart/form-data")


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    operation = (case.method.upper(), case.path)
    query = set(case.query or {})
    if operation == ("POST", "/dispatch_model"):
        fields, raw = query & DISPATCH_QUERY_FIELDS, case.media_type not in BODY_FORMS
        required = {"model_name"}
    elif operation == ("POST", "/batches"):
        fields, raw = query & BATCH_QUERY_FIELDS, case.media_type != "application/json"
        required = set()
    else:
        return True
    if not raw:
        if case.media_type == "multipart/form-data" and _positive(case):
            return not fields and _output_streamed(case.body if isinstance(case.body, dict) else {})
        return not fields and (not _positive(case) or _distinct_custom_ids(case.body))
    if not _positive(case):
        return True  # an invalid request: the server must refuse it, whatever the form
    if operation == ("POST", "/dispatch_model") and not _raw_target_fits(case.query or {}):
        return False
    return (
        required <= fields
        and ("webhook_events" not in fields or "webhook" in fields)
        and _output_streamed(case.query or {})
    )


def _output_streamed(query: dict[str, Any]) -> bool:
    """A raw body's (or a form's) `task.output` comes with `stream=true` (shared/models.py)."""
    return "task.output" not in str(query.get("webhook_events", "")) or _truthy(query.get("stream"))


def _raw_target_fits(query: dict[str, Any]) -> bool:
    """A raw body's `backend` and `operation` name a pair that takes bytes (and streams, with
    `stream=true`)."""
    table = RAW_STREAMING if _truthy(query.get("stream")) else RAW_OPERATIONS
    allowed = table.get(query.get("backend"))
    return allowed is not None and query.get("operation") in allowed


def _truthy(value: object) -> bool:
    return str(value).lower() in ("true", "1", "yes", "on")


def _positive(case: Any) -> bool:
    return case.meta is None or not case.meta.generation.mode.is_negative


def _distinct_custom_ids(body: object) -> bool:
    requests = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(requests, list):
        return True
    ids = [item.get("custom_id") for item in requests if isinstance(item, dict)]
    return len(ids) == len(set(map(repr, ids)))


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    headers = case.headers or {}
    if _positive(case) and "Idempotency-Key" in headers:
        case.headers = {**headers, "Idempotency-Key": uuid.uuid4().hex}
    return case
