"""The OpenAI-compatible client (worker/backends/openai.py) through the Caller, on a fake
upstream: each operation's path under the configured base (an SDK-style base URL ending in
/v1 included), `model` from model_name, credentials only when configured, bytes refused; and
the error body shapes OpenAI-compatible and OIP servers send, read into the message."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.backends import Backend, BackendConfig, Protocol
from shared.errors import ModelRejectedInput, UnsupportedOperation
from tests.support.upstream_fakes import Canned
from tests.unit.worker.backends.calls import (
    OPENAI_ORIGIN,
    OPENAI_TOKEN,
    call,
    failure,
    json_answer,
    make_caller,
    no_request,
    run,
    settings,
    with_bytes,
)

COMPLETION = {"id": "c-1", "object": "chat.completion", "choices": [{"index": 0}]}
CHAT = {"messages": [{"role": "user", "content": "héllo"}], "max_tokens": 3}


@pytest.mark.parametrize(
    ("operation", "path"),
    [
        ("chat.completions", "/v1/chat/completions"),
        ("completions", "/v1/completions"),
        ("embeddings", "/v1/embeddings"),
    ],
)
@pytest.mark.parametrize("backend", ["llm", "tgi"])  # configured with and without /v1
def test_each_operation_posts_to_its_path_once_under_v1(
    backend: str, operation: str, path: str
) -> None:
    caller, upstream, _ = make_caller(lambda _: json_answer(200, COMPLETION))
    answer = run(caller, call(backend, operation, body={"input": "x"}))
    assert (answer.value, answer.content_type) == (COMPLETION, None)
    [sent] = upstream.sent
    assert (sent.method, sent.url) == ("POST", OPENAI_ORIGIN + path)  # never /v1/v1
    assert sent.headers["content-type"] == "application/json"
    assert all(canned.closed for canned in upstream.answers)


@pytest.mark.parametrize(
    ("url", "protocol", "base_path"),
    [
        ("http://h:1/v1", "openai", ""),
        ("http://h:1/v1/", "openai", ""),
        ("http://h:1/proxy/v1", "openai", "/proxy"),
        ("http://h:1/proxy", "openai", "/proxy"),
        ("http://h:1/apiv1", "openai", "/apiv1"),  # not a /v1 segment
        ("http://h:1/v1/v1", "openai", "/v1"),  # only the SDK's one /v1 goes
        ("http://h:1/v1", "oip", "/v1"),  # OIP paths start at /v2: a /v1 prefix is the server's
    ],
)
def test_a_base_url_ending_in_v1_is_the_sdks(url: str, protocol: str, base_path: str) -> None:
    backend = Backend.from_config("b", BackendConfig(url=url, protocol=Protocol(protocol)))
    assert (backend.origin, backend.base_path) == ("http://h:1", base_path)


def test_a_prefixed_sdk_base_url_keeps_its_prefix() -> None:
    backends = {"gw": {"url": f"{OPENAI_ORIGIN}/gateway/openai/v1/", "protocol": "openai"}}
    caller, upstream, _ = make_caller(lambda _: json_answer(200, COMPLETION), backends=backends)
    run(caller, call("gw", "embeddings", body={"input": ["a"]}))
    assert upstream.sent[0].url == f"{OPENAI_ORIGIN}/gateway/openai/v1/embeddings"


@pytest.mark.parametrize(
    "body",
    [
        CHAT,  # no model: set
        {**CHAT, "model": "something-else"},  # another model: model_name rules
        {"model": "iris", **CHAT},  # the same: kept where it was
    ],
)
def test_model_is_set_from_model_name_and_the_rest_forwarded(body: dict[str, Any]) -> None:
    caller, upstream, _ = make_caller(lambda _: json_answer(200, COMPLETION))
    run(caller, call("llm", "chat.completions", body=body))
    sent = json.loads(upstream.sent[0].body)
    assert sent == {**body, "model": "iris"}
    if body.get("model") == "iris":  # a body already right is sent as it came
        assert (
            upstream.sent[0].body
            == json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        )


def test_the_message_body_is_not_changed_in_place() -> None:
    caller, _, _ = make_caller(lambda _: json_answer(200, COMPLETION))
    prediction = call("llm", "completions", body={"prompt": "p"})
    run(caller, prediction)
    assert prediction.body == {"prompt": "p"}  # a retry or a redelivery sees the original


def test_model_versions_have_no_place_in_the_url() -> None:
    caller, upstream, _ = make_caller(lambda _: json_answer(200, COMPLETION))
    run(caller, call("tgi", "completions", model_version="7", body={"prompt": "p"}))
    assert upstream.sent[0].url == f"{OPENAI_ORIGIN}/v1/completions"


def test_bearer_token_only_for_a_backend_that_has_one() -> None:
    caller, upstream, _ = make_caller(lambda _: json_answer(200, COMPLETION))
    run(caller, call("llm", "chat.completions", body=CHAT, token="request-token"))
    run(caller, call("tgi", "chat.completions", body=CHAT, token="request-token"))
    assert [sent.headers.get("authorization") for sent in upstream.sent] == [
        f"Bearer {OPENAI_TOKEN}",
        None,  # a request's own token is TorchServe's: never sent to another backend
    ]


@pytest.mark.parametrize("operation", ["chat.completions", "completions", "embeddings"])
def test_bytes_are_refused_before_anything_is_sent(operation: str) -> None:
    caller, upstream, _ = make_caller(no_request)
    error = failure(caller, with_bytes("llm", operation, {"size": 3}), b"abc")
    assert isinstance(error, UnsupportedOperation)
    assert (error.status, error.code) == (422, "unsupported_operation")
    assert "backend 'llm' (openai)" in error.msg
    assert "JSON" in error.msg
    assert upstream.sent == []


def test_a_json_answer_keeps_big_integers_and_a_text_answer_its_type() -> None:
    answers = [
        json_answer(200, {"usage": {"total_tokens": 2**70}}),
        Canned(200, b"plain", {"content-type": "text/plain"}),
        Canned(200, b"\x00\x01", {"content-type": "audio/wav"}),
    ]
    caller, _, _ = make_caller(lambda _: answers.pop(0))
    values = [run(caller, call("tgi", "completions")) for _ in range(3)]
    assert values[0].value == {"usage": {"total_tokens": 2**70}}
    assert (values[1].value, values[1].content_type) == ("plain", "text/plain")
    assert (values[2].value, values[2].content_type) == ("data:audio/wav;base64,AAE=", "audio/wav")


# --- the error bodies servers send, for both protocols ------------------------------------------

TARGETS = [("llm", "chat.completions"), ("kserve", "infer"), ("tgi", "embeddings")]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"error": "Input shape mismatch"}, "Input shape mismatch"),  # OIP, TGI
        (
            {
                "error": {
                    "message": "This model's maximum context length is 4096 tokens",
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": "context_length_exceeded",
                }
            },
            "This model's maximum context length is 4096 tokens",
        ),  # OpenAI
        (
            {"object": "error", "message": "max_tokens must be at least 1", "type": "BadRequest"},
            "max_tokens must be at least 1",
        ),  # vLLM's older flat shape
        (
            {
                "detail": [
                    {
                        "type": "missing",
                        "loc": ["body", "inputs", 0, "datatype"],
                        "msg": "Field required",
                        "input": {"data": ["s3cret-input"]},
                    },
                    {"loc": ["body", "id"], "msg": "Input should be a valid string"},
                ]
            },
            "body.inputs.0.datatype: Field required; body.id: Input should be a valid string",
        ),  # FastAPI's validation errors: where and what, never the input they quote
        ({"detail": "Unsupported media type"}, "Unsupported media type"),
        ({"error": {"type": "invalid", "code": 7}}, '{"type": "invalid", "code": 7}'),
        (
            {"error": "", "message": "", "status": "bad"},
            '{"error": "", "message": "", "status": "bad"}',
        ),
        ("  just text\n", "just text"),
    ],
)
def test_error_bodies_are_read_into_the_message(
    target: tuple[str, str], body: Any, said: str
) -> None:
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    reply = Canned(400, content, {"content-type": "application/json"})
    caller, _, _ = make_caller(lambda _: reply, retry_max_attempts=1)
    error = failure(caller, call(*target))
    assert isinstance(error, ModelRejectedInput)
    assert error.msg.endswith(f"rejected the input (400): {said}")
    assert "s3cret" not in error.msg


@pytest.mark.parametrize("target", TARGETS)
def test_an_error_without_a_body_says_only_the_status(target: tuple[str, str]) -> None:
    caller, _, _ = make_caller(lambda _: Canned(422), retry_max_attempts=1)
    error = failure(caller, call(*target))
    assert error.msg.endswith("rejected the input (422)")


def test_settings_used_here_configure_both_protocols() -> None:
    configured = settings().backend_map
    assert configured["llm"].protocol is Protocol.openai
    assert configured["llm"].base_path == ""  # BACKENDS gives it as .../v1
    assert configured["kserve"].base_path == "/serving"
