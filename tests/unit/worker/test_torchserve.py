"""The TorchServe client against a fake remote side (httpx.MockTransport): mapping and retries."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import pytest

from shared.errors import (
    DeadlineExceeded,
    DispatchError,
    ModelNotFound,
    ModelRejectedInput,
    TargetNotAllowed,
    TorchServeAuthRejected,
    TorchServeFailed,
    TorchServeTimeout,
    TorchServeUnavailable,
)
from shared.models import PredictionCall
from shared.settings import Settings
from worker.torchserve import TorchServeClient

ORIGIN = "http://127.0.0.1:8080"
Handler = Callable[[httpx.Request], httpx.Response]


def make_client(handler: Handler, **overrides: object) -> tuple[TorchServeClient, list[float]]:
    settings = Settings(_env_file=None, torchserve_url=ORIGIN, **overrides)  # type: ignore[arg-type]
    sleeps: list[float] = []
    client = TorchServeClient(settings, transport=httpx.MockTransport(handler), sleep=sleeps.append)
    return client, sleeps


def call(**overrides: object) -> PredictionCall:
    fields: dict[str, object] = {
        "origin": ORIGIN,
        "model_name": "echo",
        "model_version": None,
        "body": {"a": 1},
        "deadline": time.time() + 30,
        "submitted_at": time.time(),
        "priority": "default",
    }
    fields.update(overrides)
    return PredictionCall.model_validate(fields)


def error_json(status: int, kind: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"code": status, "type": kind, "message": message})


def test_success_parses_json_without_content_type() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b'{"ok": [1, 2]}')

    client, _ = make_client(handler)
    assert client.predict(call(model_version="2.0")) == {"ok": [1, 2]}
    assert str(seen[0].url) == f"{ORIGIN}/predictions/echo/2.0"
    assert json.loads(seen[0].content) == {"a": 1}


def test_non_json_answer_falls_back_to_text() -> None:
    client, _ = make_client(lambda _: httpx.Response(200, content=b"plain words"))
    assert client.predict(call()) == "plain words"


@pytest.mark.parametrize(
    ("response", "error_type", "status", "fragment"),
    [
        (
            error_json(404, "ModelNotFoundException", "Model not found: echo"),
            ModelNotFound,
            404,
            "Model not found: echo",
        ),
        (
            error_json(404, "ModelVersionNotFoundException", "Model version: 9 does not exist"),
            ModelNotFound,
            404,
            "does not exist",
        ),
        (
            error_json(422, "PredictionException", "x must be > 0"),
            ModelRejectedInput,
            422,
            "x must",
        ),
        (error_json(500, "InternalServerException", "Worker died."), TorchServeFailed, 502, "died"),
        (
            error_json(503, "InternalServerException", "Prediction failed"),
            TorchServeFailed,
            502,
            "Prediction failed",
        ),
        (
            error_json(400, "InvalidKeyException", "Token Authorization failed"),
            TorchServeAuthRejected,
            502,
            "TORCHSERVE_TOKEN",
        ),
        (
            httpx.Response(302, headers={"location": "http://evil"}),
            TorchServeFailed,
            502,
            "redirect",
        ),
    ],
)
def test_error_answers_map_without_retry(
    response: httpx.Response, error_type: type[DispatchError], status: int, fragment: str
) -> None:
    calls = 0

    def handler(_: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return response

    client, sleeps = make_client(handler)
    with pytest.raises(error_type) as caught:
        client.predict(call())
    assert caught.value.status == status
    assert fragment in caught.value.msg
    assert calls == 1
    assert sleeps == []


def test_503_is_retried_with_growing_bounded_backoff_then_fails() -> None:
    attempts = 0

    def handler(_: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        return error_json(503, "ServiceUnavailableException", "Model echo has no worker")

    client, sleeps = make_client(
        handler, retry_max_attempts=5, retry_backoff_initial=0.1, retry_backoff_max=0.3
    )
    with pytest.raises(TorchServeUnavailable) as caught:
        client.predict(call())
    assert attempts == 5
    assert len(sleeps) == 4
    assert all(0.05 <= delay <= 0.3 for delay in sleeps)
    assert sleeps[-1] > sleeps[0]  # 0.1 -> capped 0.3, jitter at most halves
    assert ORIGIN in caught.value.msg
    assert caught.value.status == 503


def test_transient_503_then_success() -> None:
    answers = [error_json(503, "ServiceUnavailableException", "busy"), httpx.Response(200, json=7)]
    client, sleeps = make_client(lambda _: answers.pop(0))
    assert client.predict(call()) == 7
    assert len(sleeps) == 1


def test_connection_refused_is_retried_and_names_the_target() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client, sleeps = make_client(handler, retry_max_attempts=3)
    with pytest.raises(TorchServeUnavailable, match="cannot connect to TorchServe at http"):
        client.predict(call())
    assert len(sleeps) == 2


def test_read_timeout_is_retried_then_504() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    client, sleeps = make_client(handler, retry_max_attempts=2, torchserve_read_timeout=5)
    with pytest.raises(TorchServeTimeout) as caught:
        client.predict(call())
    assert caught.value.status == 504
    assert len(sleeps) == 1


def test_no_retry_that_cannot_finish_before_the_deadline() -> None:
    def handler(_: httpx.Request) -> httpx.Response:
        return error_json(503, "ServiceUnavailableException", "busy")

    client, sleeps = make_client(handler, retry_backoff_initial=2.0, retry_backoff_max=2.0)
    with pytest.raises(DeadlineExceeded) as caught:
        client.predict(call(deadline=time.time() + 0.5))
    assert caught.value.status == 504
    assert sleeps == []


def test_past_deadline_sends_nothing() -> None:
    calls = 0

    def handler(_: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(200, json=1)

    client, _ = make_client(handler)
    with pytest.raises(DeadlineExceeded):
        client.predict(call(deadline=time.time() - 1))
    assert calls == 0


def test_target_off_the_allow_list_is_refused_without_a_request() -> None:
    def handler(_: httpx.Request) -> httpx.Response:
        raise AssertionError("no request may be sent")

    client, _ = make_client(handler)
    with pytest.raises(TargetNotAllowed):
        client.predict(call(origin="http://169.254.169.254:80"))


@pytest.mark.parametrize(
    ("overrides", "settings", "expected"),
    [
        ({"token": "req-token"}, {"torchserve_token": "default"}, "Bearer req-token"),
        ({}, {"torchserve_token": "default"}, "Bearer default"),
        ({"username": "u", "password": "p"}, {}, "Basic dTpw"),
        ({}, {}, None),
    ],
)
def test_credentials(
    overrides: dict[str, str], settings: dict[str, str], expected: str | None
) -> None:
    headers: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        headers.append(request.headers.get("authorization"))
        return httpx.Response(200, json=1)

    client, _ = make_client(handler, **settings)
    client.predict(call(**overrides))
    assert headers == [expected]


def test_call_repr_hides_credentials() -> None:
    text = repr(call(token="s3cret-token", password="s3cret-pw", username="bob"))
    assert "s3cret" not in text
    assert "/predictions/echo" in text
