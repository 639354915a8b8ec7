"""The API builds Celery messages itself; they must match what Celery's own producer would send."""

from __future__ import annotations

import base64
import json
from typing import Any

from kombu import Connection

from shared.celery_app import QUEUE, TASK_PREDICT, create_celery_app, encode_task_message
from shared.settings import Settings

# Fields that differ per process or per message by design.
VOLATILE_HEADERS = {"origin", "argsrepr", "kwargsrepr", "ignore_result"}
VOLATILE_PROPERTIES = {"reply_to", "delivery_tag", "argsrepr", "kwargsrepr"}


def celery_own_message(kwargs: dict[str, Any]) -> dict[str, Any]:
    """What `send_task` pushes, captured through kombu's in-memory transport."""
    app = create_celery_app(Settings(_env_file=None))  # type: ignore[call-arg]
    app.conf.broker_url = "memory://"
    with Connection("memory://") as connection:
        app.send_task(
            TASK_PREDICT, kwargs=kwargs, task_id="t-1", queue=QUEUE, connection=connection
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


def test_message_matches_celery_protocol_2() -> None:
    kwargs = {"call": {"model_name": "echo", "body": {"x": [1, 2]}}}
    ours = json.loads(encode_task_message("t-1", kwargs))
    theirs = celery_own_message(kwargs)

    assert ours["content-type"] == theirs["content-type"] == "application/json"
    assert ours["content-encoding"] == theirs["content-encoding"]
    assert json.loads(base64.b64decode(ours["body"])) == json.loads(theirs["body"])
    assert set(ours["headers"]) == set(theirs["headers"])
    for name, value in theirs["headers"].items():
        if name not in VOLATILE_HEADERS:
            assert ours["headers"][name] == value, name
    for name in ("correlation_id", "delivery_mode", "priority"):
        assert ours["properties"][name] == theirs["properties"][name], name
    assert ours["properties"]["delivery_info"]["routing_key"] == QUEUE
    assert ours["properties"]["body_encoding"] == "base64"


def test_credentials_are_redacted_from_the_reprs() -> None:
    message = json.loads(encode_task_message("t-2", {"call": {"token": "s3cret"}}))
    assert "s3cret" not in json.dumps(message["headers"])
    assert "s3cret" not in json.dumps(message["properties"])


def test_every_message_gets_its_own_delivery_tag() -> None:
    tags = {
        json.loads(encode_task_message("t", {}))["properties"]["delivery_tag"] for _ in range(50)
    }
    assert len(tags) == 50
