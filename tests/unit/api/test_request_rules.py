"""Pure request rules: the wait preference, the target allow-list, the model name, the body, and
the backend and operation a request resolves to."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.preferences import wait_preference
from api.targets import resolve_origin, resolve_target
from shared.backends import Protocol, Target
from shared.errors import InvalidRequest, TargetNotAllowed, UnknownBackend, UnsupportedOperation
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


# --- resolve_target: the backend and the operation -------------------------------------------

BACKENDS = (
    '{"mls": {"url": "http://127.0.0.1:9100/prefix", "protocol": "oip"}, '
    '"llm": {"url": "http://127.0.0.1:9200/v1", "protocol": "openai", "token": "TOKEN-x"}, '
    '"ts2": {"url": "http://10.0.0.9:8080", "protocol": "torchserve"}}'
)


def backends(**overrides: object) -> Settings:
    return Settings(_env_file=None, backends=BACKENDS, **overrides)  # type: ignore[arg-type]


def target_of(settings: Settings, **fields: object) -> Target:
    return resolve_target(PredictionRequest.model_validate({"model_name": "m", **fields}), settings)


def test_a_request_naming_no_backend_goes_to_the_default_with_its_default_operation() -> None:
    assert target_of(backends()) == Target(
        "torchserve", Protocol.torchserve, "http://127.0.0.1:8080", "predictions"
    )
    assert target_of(backends(default_backend="mls")) == Target(
        "mls", Protocol.oip, "http://127.0.0.1:9100", "infer"
    )


MLS, LLM, TS = "http://127.0.0.1:9100", "http://127.0.0.1:9200", "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"backend": "mls"}, ("mls", Protocol.oip, MLS, "infer")),
        ({"backend": "mls", "operation": "generate"}, ("mls", Protocol.oip, MLS, "generate")),
        (
            {"backend": "llm", "operation": "embeddings"},
            ("llm", Protocol.openai, LLM, "embeddings"),
        ),
        ({"backend": "llm"}, ("llm", Protocol.openai, LLM, "chat.completions")),
        ({"operation": "explanations"}, ("torchserve", Protocol.torchserve, TS, "explanations")),
        ({"backend": "ts2"}, ("ts2", Protocol.torchserve, "http://10.0.0.9:8080", "predictions")),
    ],
)
def test_the_backend_and_operation_named(
    fields: dict[str, object], expected: tuple[object, ...]
) -> None:
    assert target_of(backends(), **fields) == Target(*expected)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["nope", "", "TorchServe", "mls " * 40])
def test_an_unknown_backend_is_422_listing_the_configured_ones(name: str) -> None:
    with pytest.raises(UnknownBackend) as caught:
        target_of(backends(), backend=name)
    assert (caught.value.status, caught.value.code) == (422, "unknown_backend")
    assert "configured: llm, mls, torchserve, ts2" in caught.value.msg
    assert len(caught.value.msg) < 200  # a long name is cut, not echoed whole
    assert "TOKEN" not in caught.value.msg


@pytest.mark.parametrize(
    ("backend", "operation", "listed"),
    [
        ("torchserve", "infer", "predictions, explanations"),
        ("mls", "predictions", "infer, generate"),
        ("llm", "chat", "chat.completions, completions, embeddings"),
        ("llm", "", "chat.completions, completions, embeddings"),
    ],
)
def test_an_operation_of_another_protocol_is_422_listing_the_backends(
    backend: str, operation: str, listed: str
) -> None:
    with pytest.raises(UnsupportedOperation) as caught:
        target_of(backends(), backend=backend, operation=operation)
    assert caught.value.status == 422
    assert f"use one of: {listed}" in caught.value.msg


def test_torchserve_targets_are_for_torchserve_only() -> None:
    with pytest.raises(InvalidRequest) as caught:
        target_of(backends(), backend="mls", host="127.0.0.1", port=9100)
    assert "host/port/http_protocol" in caught.value.msg
    allowed = backends(torchserve_allowed_targets="http://10.0.0.5:8080")
    assert target_of(allowed, host="10.0.0.5").origin == "http://10.0.0.5:8080"
    assert target_of(allowed, host="10.0.0.5", operation="explanations").operation == (
        "explanations"
    )


def test_a_requests_credentials_and_versions_are_refused_where_they_would_be_ignored() -> None:
    with pytest.raises(InvalidRequest) as caught:
        target_of(backends(), backend="mls", token="secret-value")
    assert caught.value.msg.startswith("token: ")
    assert "secret-value" not in caught.value.msg
    with pytest.raises(InvalidRequest) as caught:
        target_of(backends(), backend="mls", username="u", password="p")
    assert caught.value.msg.startswith("username/password: ")
    with pytest.raises(InvalidRequest) as caught:
        target_of(backends(), backend="llm", model_version="2")
    assert caught.value.msg.startswith("model_version: ")
    assert target_of(backends(), token="t").backend == "torchserve"  # TorchServe's, as ever
