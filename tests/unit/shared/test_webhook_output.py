"""The task.output body (shared/webhook_output.py), sent signed by the real sender to a real
local receiver and checked with the Standard Webhooks reference library; and its subscription
only with `stream: true`."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from standardwebhooks import Webhook

from shared.models import PredictionRequest
from shared.settings import Settings
from shared.webhook_output import output_body, output_data
from tests.support.webhook_receiver import Receiver
from worker.webhook_sender import WebhookSender

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
TASK = "6a1c3c9e-1111-4222-8333-944455556666"


def _event(url: str = "https://hooks.example.com/x") -> dict[str, str]:
    """A task.output event as outbox_claim returns it after reading its outputs."""
    entries = [
        ["1700000001000-0", "output", 1, '{"i":0,"t":1.5}'],
        ["1700000001100-0", "restart", 2, ""],
        ["1700000001200-0", "output", 2, '"tok0 "'],
    ]
    return {
        "task_id": TASK,
        "type": "task.output",
        "seq": "3",
        "at": "1700000001.25",
        "url": url,
        "state": "sending",
        "outputs": json.dumps(entries),
        "from": "1700000000900-1",
        "last_event_id": "1700000001200-0",
        "status": "running",
        "final": "0",
    }


def test_the_body_carries_the_stream_s_events_with_their_ids() -> None:
    body = json.loads(output_body(_event()))
    assert (body["type"], body["timestamp"]) == ("task.output", "2023-11-14T22:13:21.250000Z")
    assert body["data"] == {
        "task_id": TASK,
        "status": "running",
        "seq": 3,
        "from": "1700000000900-1",
        "last_event_id": "1700000001200-0",
        "final": False,
        "stream_url": f"/tasks/{TASK}/stream",
        "events": [
            {"id": "1700000001000-0", "event": "output", "data": {"i": 0, "t": 1.5}},
            {"id": "1700000001100-0", "event": "restart", "data": {"attempt": 2}},
            {"id": "1700000001200-0", "event": "output", "data": "tok0 "},
        ],
    }


def test_an_event_read_after_its_record_expired_or_with_nothing_left() -> None:
    event = {**_event(), "outputs": "[]", "status": "", "final": "1"}
    event["last_event_id"] = event["from"]
    data = output_data(event)
    assert (data["events"], data["status"], data["final"]) == ([], None, True)
    assert data["from"] == data["last_event_id"]
    # Output that is not JSON (never written by the worker) is passed on as its text.
    odd = {**_event(), "outputs": json.dumps([["1-0", "output", 1, "not json"]])}
    assert output_data(odd)["events"][0]["data"] == "not json"


def test_the_sender_signs_the_task_output_body() -> None:
    receiver = Receiver().start()
    settings = Settings(
        webhook_allowed_origins=[receiver.origin],  # type: ignore[list-item]
        webhook_secret=[SECRET],  # type: ignore[list-item]
        webhook_timeout=5,
    )
    sender = WebhookSender(settings)
    try:
        result = sender.send("msg_x_output_3", _event(receiver.origin + "/out"))
        (request,) = receiver.requests("/out", 1, 10)
    finally:
        sender.close()
        receiver.stop()
    assert result.status == 204
    payload = Webhook(SECRET).verify(request.body, request.headers)
    assert request.headers["webhook-id"] == "msg_x_output_3"
    assert payload == json.loads(output_body(_event()))


def test_task_output_needs_a_stream() -> None:
    hook = {"model_name": "m", "webhook": "https://hooks.example.com/x"}
    with pytest.raises(ValidationError, match='add "stream": true'):
        PredictionRequest.model_validate({**hook, "webhook_events": ["task.output"]})
    with pytest.raises(ValidationError, match="streamed task"):
        PredictionRequest.model_validate(
            {**hook, "stream": "false", "webhook_events": "task.succeeded,task.output"}
        )
    asked = PredictionRequest.model_validate(
        {**hook, "stream": "true", "webhook_events": "task.output, task.succeeded"}
    )
    assert asked.webhook_event_types() == ("task.output", "task.succeeded")
    # Not among the defaults: only who asks for it gets it.
    plain = PredictionRequest.model_validate({**hook, "stream": True})
    assert "task.output" not in plain.webhook_event_types()
