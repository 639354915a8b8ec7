"""shared/models.py: the call a request becomes, built in one place for single and batch submits."""

from __future__ import annotations

import json

from pydantic import SecretStr

from shared.backends import TORCHSERVE, Protocol, Target
from shared.models import PredictionCall, PredictionRequest, call_fields
from shared.payloads import Part, PayloadRef
from shared.priorities import Priority

ORIGIN = "http://127.0.0.1:8080"
TARGET = Target(TORCHSERVE, Protocol.torchserve, ORIGIN, "predictions")


def test_call_fields_are_exactly_a_prediction_calls() -> None:
    request = PredictionRequest(
        model_name="linear",
        model_version="2.0",
        input={"x": [1, 2]},
        token=SecretStr("tok"),
        username="alice",
        password=SecretStr("pw"),
    )
    fields = call_fields(request, TARGET, 200.0, 100.0, Priority.batch, None)
    assert set(fields) == set(PredictionCall.model_fields)
    call = PredictionCall.model_validate(json.loads(json.dumps(fields)))  # as the worker reads it
    assert call.model_dump() == {
        "origin": ORIGIN,
        "model_name": "linear",
        "model_version": "2.0",
        "body": request.torchserve_body(),
        "backend": TORCHSERVE,
        "operation": "predictions",
        "payload": None,
        "deadline": 200.0,
        "submitted_at": 100.0,
        "priority": Priority.batch,
        "token": "tok",
        "username": "alice",
        "password": "pw",
        "stream": False,
    }


def test_a_call_with_a_payload_carries_no_body() -> None:
    request = PredictionRequest(model_name="echo")
    part = Part(content_type="image/png", size=3)
    ref = PayloadRef(parts=(part,), multipart=False, inline="QUJD")
    fields = call_fields(request, TARGET, 2.0, 1.0, Priority.default, ref)
    call = PredictionCall.model_validate(json.loads(json.dumps(fields)))
    assert (call.body, call.payload) == (None, ref)
    assert (call.token, call.password) == (None, None)


def test_an_openai_call_gets_its_model_from_model_name_and_an_oip_body_is_unchanged() -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "model": "ignored"}
    request = PredictionRequest(model_name="smollm", input=chat)
    openai = Target("llm", Protocol.openai, "http://h:8000", "chat.completions")
    fields = call_fields(request, openai, 2.0, 1.0, Priority.default, None)
    assert fields["body"] == {**chat, "model": "smollm"}
    assert (fields["backend"], fields["operation"], fields["origin"]) == (
        "llm",
        "chat.completions",
        "http://h:8000",
    )
    tensors = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
    oip = Target("mls", Protocol.oip, "http://h:9000", "infer")
    request = PredictionRequest(model_name="iris", input=tensors)
    assert call_fields(request, oip, 2.0, 1.0, Priority.default, None)["body"] == tensors
