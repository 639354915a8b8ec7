"""shared/models.py: the call a request becomes, built in one place for single and batch submits."""

from __future__ import annotations

import json

from pydantic import SecretStr

from shared.models import PredictionCall, PredictionRequest, call_fields
from shared.payloads import Part, PayloadRef
from shared.priorities import Priority

ORIGIN = "http://127.0.0.1:8080"


def test_call_fields_are_exactly_a_prediction_calls() -> None:
    request = PredictionRequest(
        model_name="linear",
        model_version="2.0",
        input={"x": [1, 2]},
        token=SecretStr("tok"),
        username="alice",
        password=SecretStr("pw"),
    )
    fields = call_fields(request, ORIGIN, 200.0, 100.0, Priority.batch, None)
    assert set(fields) == set(PredictionCall.model_fields)
    call = PredictionCall.model_validate(json.loads(json.dumps(fields)))  # as the worker reads it
    assert call.model_dump() == {
        "origin": ORIGIN,
        "model_name": "linear",
        "model_version": "2.0",
        "body": request.torchserve_body(),
        "payload": None,
        "deadline": 200.0,
        "submitted_at": 100.0,
        "priority": Priority.batch,
        "token": "tok",
        "username": "alice",
        "password": "pw",
    }


def test_a_call_with_a_payload_carries_no_body() -> None:
    request = PredictionRequest(model_name="echo")
    part = Part(content_type="image/png", size=3)
    ref = PayloadRef(parts=(part,), multipart=False, inline="QUJD")
    fields = call_fields(request, ORIGIN, 2.0, 1.0, Priority.default, ref)
    call = PredictionCall.model_validate(json.loads(json.dumps(fields)))
    assert (call.body, call.payload) == (None, ref)
    assert (call.token, call.password) == (None, None)
