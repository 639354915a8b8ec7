"""The API builds Celery messages itself; they must match what Celery's own producer would send."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from kombu import Connection

from shared.celery_app import (
    QUEUE,
    TASK_PREDICT_MANY,
    create_celery_app,
    encode_message,
    encode_messages,
    encode_task_message,
)
from shared.settings import Settings

# Fields that differ per process or per message by design.
VOLATILE_HEADERS = {"origin", "argsrepr", "kwargsrepr", "ignore_result"}
VOLATILE_PROPERTIES = {"reply_to", "delivery_tag", "argsrepr", "kwargsrepr"}
CALLS = [{"model_name": "echo", "body": {"x": [1, 2]}}, {"model_name": "echo", "input": 3}]
TASKS = [{"id": f"t-{n}", "call": call, "headers": {}} for n, call in enumerate(CALLS, 1)]


def celery_own_message(kwargs: dict[str, Any], task_id: str) -> dict[str, Any]:
    """What `send_task` pushes, captured through kombu's in-memory transport."""
    app = create_celery_app(Settings(_env_file=None))  # type: ignore[call-arg]
    app.conf.broker_url = "memory://"
    with Connection("memory://") as connection:
        app.send_task(
            TASK_PREDICT_MANY, kwargs=kwargs, task_id=task_id, queue=QUEUE, connection=connection
        )
        message = connection.SimpleQueue(QUEUE).get(timeout=1)
        envelope: dict[str, Any] = {
            "body": message.body,
            "headers": message.headers,
            "properties": message.properties,
            "content-type": message.content_type,
            "content-encoding": message.content_encoding,
        }
    return envelope


@pytest.mark.parametrize(
    "ours",
    [
        encode_message(TASKS),
        encode_messages([(t["id"], json.dumps(t["call"])) for t in TASKS], per_message=2)[0],
    ],
    ids=["encode_message", "encode_messages"],
)
def test_message_matches_celery_protocol_2(ours: str) -> None:
    envelope = json.loads(ours)
    theirs = celery_own_message({"tasks": TASKS}, task_id="t-1")

    assert envelope["headers"]["task"] == TASK_PREDICT_MANY
    assert envelope["content-type"] == theirs["content-type"] == "application/json"
    assert envelope["content-encoding"] == theirs["content-encoding"]
    assert json.loads(base64.b64decode(envelope["body"])) == json.loads(theirs["body"])
    assert set(envelope["headers"]) == set(theirs["headers"])
    for name, value in theirs["headers"].items():
        if name not in VOLATILE_HEADERS:
            assert envelope["headers"][name] == value, name
    for name in ("correlation_id", "delivery_mode", "priority"):
        assert envelope["properties"][name] == theirs["properties"][name], name
    assert envelope["properties"]["delivery_info"]["routing_key"] == QUEUE
    assert envelope["properties"]["body_encoding"] == "base64"


def test_credentials_are_redacted_from_the_reprs() -> None:
    message = json.loads(encode_task_message("t-2", {"call": {"token": "s3cret"}}))
    assert "s3cret" not in json.dumps(message["headers"])
    assert "s3cret" not in json.dumps(message["properties"])


def test_every_message_gets_its_own_delivery_tag() -> None:
    tags = {
        json.loads(encode_task_message("t", {}))["properties"]["delivery_tag"] for _ in range(50)
    }
    assert len(tags) == 50
