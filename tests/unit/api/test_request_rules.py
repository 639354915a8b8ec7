"""Pure request rules: the wait preference, the target allow-list, the model name and the body."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.preferences import wait_preference
from api.targets import resolve_origin
from shared.errors import TargetNotAllowed
from shared.models import PredictionRequest
from shared.settings import Settings


@pytest.fixture
def settings() -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        torchserve_url="http://127.0.0.1:8080",
        torchserve_allowed_targets="https://ts.internal:8443, http://10.0.0.5:8080",  # type: ignore[arg-type]
        dispatch_default_wait=60,
        dispatch_max_wait=300,
    )


@pytest.mark.parametrize(
    ("prefer", "query", "seconds", "applied"),
    [
        (None, None, 60, None),
        ("respond-async", None, 0, "respond-async"),
        ("wait=5", None, 5, "wait=5"),
        ("respond-async, wait=5", None, 5, "wait=5"),
        ("wait=100000", None, 300, "wait=300"),
        ("wait=abc", None, 60, None),
        ("wait=-3", None, 60, None),
        ("handling=lenient, return=minimal", None, 60, None),
        ("RESPOND-ASYNC; foo=bar", None, 0, "respond-async"),
        ("respond-async", 2.5, 2.5, None),
        (None, 0, 0, None),
        (None, 9999, 300, None),
    ],
)
def test_wait_preference(
    settings: Settings, prefer: str | None, query: float | None, seconds: float, applied: str | None
) -> None:
    preference = wait_preference(prefer, query, settings)
    assert (preference.seconds, preference.applied) == (seconds, applied)


@pytest.mark.parametrize(
    ("fields", "origin"),
    [
        ({}, "http://127.0.0.1:8080"),
        ({"host": "127.0.0.1", "port": 8080}, "http://127.0.0.1:8080"),
        (
            {"http_protocol": "HTTPS", "host": "TS.internal", "port": 8443},
            "https://ts.internal:8443",
        ),
        ({"host": "10.0.0.5"}, "http://10.0.0.5:8080"),
    ],
)
def test_allowed_targets(settings: Settings, fields: dict[str, object], origin: str) -> None:
    request = PredictionRequest.model_validate({"model_name": "echo", **fields})
    assert resolve_origin(request, settings) == origin


@pytest.mark.parametrize(
    "fields",
    [
        {"host": "169.254.169.254"},
        {"host": "127.0.0.1", "port": 6379},
        {"http_protocol": "https"},  # same host and port, other scheme: another target
        {"host": "ts.internal"},  # allowed only on 8443 over https
    ],
)
def test_targets_off_the_list_are_forbidden(settings: Settings, fields: dict[str, object]) -> None:
    request = PredictionRequest.model_validate({"model_name": "echo", **fields})
    with pytest.raises(TargetNotAllowed) as caught:
        resolve_origin(request, settings)
    assert caught.value.status == 403
    assert "TORCHSERVE_ALLOWED_TARGETS" in caught.value.msg


@pytest.mark.parametrize(
    "name", ["a/b", "..", ".", "%2F", "a b", "x" * 129, "", "ec\\ho", "a?b", "a#b", "ü"]
)
def test_bad_model_names_are_rejected(name: str) -> None:
    with pytest.raises(ValidationError):
        PredictionRequest.model_validate({"model_name": name})
    with pytest.raises(ValidationError):
        PredictionRequest.model_validate({"model_name": "ok", "model_version": name})


@pytest.mark.parametrize("name", ["echo", "my_model-v2.1", "A" * 128, "..a", "1"])
def test_good_model_names(name: str) -> None:
    assert PredictionRequest.model_validate({"model_name": name}).model_name == name


def test_body_is_the_input_when_given() -> None:
    request = PredictionRequest.model_validate({"model_name": "m", "input": [1, {"a": None}]})
    assert request.torchserve_body() == [1, {"a": None}]


def test_original_request_shape_gives_the_original_body() -> None:
    original = {
        "model_name": "doc_model",
        "host": "127.0.0.1",
        "port": 8080,
        "http_protocol": "http",
        "smarttool": "ocr",
        "max_model_page": 5,
        "postprocessingsteps": ["dedupe", "sort"],
        "input_media_type": "application/pdf",
        "username": "bob",
        "password": "pw",
        "token": "tk",
    }
    request = PredictionRequest.model_validate(original)
    assert request.torchserve_body() == {
        "max-model-page": 5,
        "postprocessingsteps": ["dedupe", "sort"],
        "input-media-type": "application/pdf",
    }
    assert "pw" not in repr(request)
    assert "tk" not in repr(request)
