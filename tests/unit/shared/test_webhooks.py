"""Webhook and idempotency pieces without servers: signatures (checked by `standardwebhooks`),
the allow-list rules, the send-time address check, Idempotency-Key parsing, fingerprints."""

from __future__ import annotations

import json
import time

import pytest
from pydantic import ValidationError
from standardwebhooks import Webhook

from api.idempotency import fingerprint_of, parse_key
from shared.backends import TORCHSERVE, Protocol, Target
from shared.errors import InvalidIdempotencyKey
from shared.models import PredictionRequest
from shared.payloads import Part, Payload
from shared.settings import Settings
from shared.webhooks import (
    OriginRule,
    TargetRefused,
    event_body,
    match_target,
    secret_bytes,
    signature,
)
from worker.webhook_sender import WebhookSender, _retry_after

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ROTATED = "whsec_c2VjcmV0LXRoYXQtaXMtYmVpbmctcm90YXRlZC1vdXQ="


def _event() -> dict[str, str]:
    record = ["status", "succeeded", "model_name", "echo", "created_at", "1700000000.5"]
    record += ["deadline", "1700000600", "finished_at", "1700000001", "result", '{"a": 1}']
    record += ["webhook", "https://secret.example/path?token=x", "owner", "abc"]
    record += ["priority", "default"]  # every record has one (task_submit, batch_add_items)
    return {
        "task_id": "6a1c3c9e-1111-4222-8333-944455556666",
        "type": "task.succeeded",
        "at": "1700000001.25",
        "url": "https://hooks.example.com/x",
        "record": json.dumps(record),
    }


def test_signatures_verify_with_the_reference_library_for_both_rotated_secrets() -> None:
    body = event_body(_event())
    now = int(time.time())
    header = signature([secret_bytes(SECRET), secret_bytes(ROTATED)], "msg_1_succeeded", now, body)
    headers = {"webhook-id": "msg_1_succeeded", "webhook-timestamp": str(now)}
    for secret in (SECRET, ROTATED):
        payload = Webhook(secret).verify(body, {**headers, "webhook-signature": header})
        assert payload["type"] == "task.succeeded"
        assert payload["timestamp"] == "2023-11-14T22:13:21.250000Z"
        assert payload["data"]["prediction_value"] == {"a": 1}
        # The task view only: never the webhook URL or the owner.
        assert "webhook" not in payload["data"]
        assert "owner" not in payload["data"]


def test_secrets_must_be_whsec_base64() -> None:
    for bad in ("plain", "whsec_!!!", "whsec_YWJj"):
        with pytest.raises(ValueError, match="WEBHOOK_SECRET"):
            secret_bytes(bad)
    with pytest.raises(ValidationError, match="WEBHOOK_SECRET"):
        Settings(webhook_allowed_origins=["https://*"])  # type: ignore[arg-type]


def test_origin_rules() -> None:
    assert str(OriginRule.parse("https://*.Example.com")) == "https://*.example.com:443"
    for bad in ("https://a*.b", "https://x/y", "ftp://x", "https://*.*.x"):
        with pytest.raises(ValueError, match="WEBHOOK_ALLOWED_ORIGINS"):
            OriginRule.parse(bad)
    origins = ["https://*.example.com", "http://10.0.0.5:8080", "https://*"]
    assert match_target("https://a.example.com/x", origins).exact is False
    assert match_target("http://10.0.0.5:8080/x", origins).exact is True  # listed: trusted
    assert match_target("https://93.184.216.34/x", origins).exact is False
    for refused in (
        "http://a.example.com/x",  # scheme
        "https://10.0.0.5/x",  # private, admitted by a wildcard only
        "https://[::ffff:127.0.0.1]/x",
        "https://user:pw@a.example.com/",
        "http://10.0.0.5:8081/x",
    ):
        with pytest.raises(TargetRefused):
            match_target(refused, origins)
    with pytest.raises(TargetRefused, match="empty"):
        match_target("https://a.example.com/", [])


def test_send_time_check_refuses_a_wildcard_host_that_resolves_privately() -> None:
    settings = Settings(
        webhook_allowed_origins=["http://*:9"],  # type: ignore[arg-type]
        webhook_secret=[SECRET],  # type: ignore[list-item]
        webhook_timeout=1,
    )
    sender = WebhookSender(settings)
    try:
        result = sender.send("msg_x", {**_event(), "url": "http://localhost:9/hook"})
    finally:
        sender.close()
    # Not sent, and retried later (DNS may change back), unlike an origin taken off the list.
    assert result.status is None
    assert not result.refused
    assert result.error is not None
    assert "private" in result.error


def test_retry_after() -> None:
    assert _retry_after("7") == 7.0
    assert _retry_after(None) is None
    assert _retry_after("soon") is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


@pytest.mark.parametrize(
    ("header", "key"),
    [
        ('"abc"', "abc"),
        ("abc", "abc"),
        ('"a \\"q\\" b"', 'a "q" b'),
        ("8e03978e-40d5", "8e03978e-40d5"),
    ],
)
def test_idempotency_key_forms(header: str, key: str) -> None:
    assert parse_key([header]) == key


@pytest.mark.parametrize("header", ['""', '"x', "a b", "k" * 256, '"' + "k" * 256 + '"', "é"])
def test_malformed_idempotency_keys(header: str) -> None:
    with pytest.raises(InvalidIdempotencyKey, match="Idempotency-Key"):
        parse_key([header])
    assert parse_key([]) is None


T1 = Target(TORCHSERVE, Protocol.torchserve, "http://t:1", "predictions")


def test_fingerprint_covers_the_request_but_not_credentials_or_key_order() -> None:
    base = {"model_name": "m", "input": {"a": 1, "b": 2}}
    fp = fingerprint_of(PredictionRequest.model_validate(base), T1, None)
    same = {"model_name": "m", "input": {"b": 2, "a": 1}, "token": "secret"}
    assert fingerprint_of(PredictionRequest.model_validate(same), T1, None) == fp
    for changed in (
        {**base, "model_version": "2"},
        {**base, "timeout": 5},
        {**base, "webhook": "https://h/x"},
        {**base, "input": {"a": 1}},
    ):
        assert fingerprint_of(PredictionRequest.model_validate(changed), T1, None) != fp
    other_origin = Target(TORCHSERVE, Protocol.torchserve, "http://u:1", "predictions")
    assert fingerprint_of(PredictionRequest.model_validate(base), other_origin, None) != fp
    explain = Target(TORCHSERVE, Protocol.torchserve, "http://t:1", "explanations")
    assert fingerprint_of(PredictionRequest.model_validate(base), explain, None) != fp
    request = PredictionRequest.model_validate({"model_name": "m"})
    one = Payload(b"abc", [Part(content_type="image/png", size=3)], False)
    other = Payload(b"abd", [Part(content_type="image/png", size=3)], False)
    assert fingerprint_of(request, T1, one) != fingerprint_of(request, T1, other)
