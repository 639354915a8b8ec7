"""The Open Inference Protocol client (worker/backends/oip.py) through the Caller, on a fake
upstream: what each call sends (URL, base path, credentials, the JSON body as it came, bytes
as binary BYTES tensors), and how an error status maps onto the error tree, for OIP and
OpenAI alike (both use base.status_error)."""

from __future__ import annotations

import json
import struct
import time
from email.utils import formatdate

import pytest

from shared.errors import (
    BackendAuthRejected,
    BackendFailed,
    BackendUnavailable,
    DispatchError,
    ModelNotFound,
    ModelRejectedInput,
    UnsupportedOperation,
)
from tests.support.upstream_fakes import Canned
from tests.unit.worker.backends.calls import (
    OIP_ORIGIN,
    OIP_TOKEN,
    OPENAI_TOKEN,
    call,
    failure,
    json_answer,
    make_caller,
    no_request,
    run,
    with_bytes,
)

INFERENCE = {"model_name": "iris", "outputs": [{"name": "p", "datatype": "FP32", "data": [0.5]}]}


def test_infer_posts_the_body_unchanged_to_the_model_url_without_credentials() -> None:
    caller, upstream, _ = make_caller(lambda _: json_answer(200, INFERENCE))
    body = {
        "id": "r-1",
        "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.5, -2]}],
        "parameters": {"température": "élevée", "z": None},
        "outputs": [{"name": "p"}],
    }
    answer = run(caller, call("mls", "infer", body=body))
    assert (answer.value, answer.content_type) == (INFERENCE, None)
    [sent] = upstream.sent
    assert (sent.method, sent.url) == ("POST", f"{OIP_ORIGIN}/v2/models/iris/infer")
    # The body as the message carried it: same keys in the same order, compact UTF-8.
    assert sent.body == json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    assert sent.headers["content-type"] == "application/json"
    assert "authorization" not in sent.headers  # `mls` has no token
    assert "inference-header-content-length" not in sent.headers
    assert all(canned.closed for canned in upstream.answers)


@pytest.mark.parametrize(
    ("model", "version", "path"),
    [
        ("iris", "2", "/v2/models/iris/versions/2/infer"),
        ("my model/a", None, "/v2/models/my%20model%2Fa/infer"),
        ("a?b#c", "v1/β", "/v2/models/a%3Fb%23c/versions/v1%2F%CE%B2/infer"),
        ("iris", "", "/v2/models/iris/infer"),  # an empty version is no version
    ],
)
def test_model_and_version_are_percent_encoded_path_parts(
    model: str, version: str | None, path: str
) -> None:
    caller, upstream, _ = make_caller(lambda _: json_answer(200, INFERENCE))
    run(caller, call("mls", "infer", model_name=model, model_version=version))
    assert upstream.sent[0].url == OIP_ORIGIN + path


def test_base_path_and_bearer_token_of_the_configured_backend() -> None:
    caller, upstream, _ = make_caller(lambda _: json_answer(200, INFERENCE))
    run(caller, call("kserve", "infer", model_version="3", token="request-token"))
    [sent] = upstream.sent
    # BACKENDS gives `http://.../serving/`: its path goes before /v2, without a double slash.
    assert sent.url == f"{OIP_ORIGIN}/serving/v2/models/iris/versions/3/infer"
    # The backend's token; a request's own token is TorchServe's and never reaches OIP.
    assert sent.headers["authorization"] == f"Bearer {OIP_TOKEN}"


def test_generate_posts_json_to_the_generate_extension() -> None:
    caller, upstream, _ = make_caller(lambda _: json_answer(200, {"text_output": "hi"}))
    body = {"text_input": "say hi", "parameters": {"max_tokens": 4}}
    assert run(caller, call("mls", "generate", body=body)).value == {"text_output": "hi"}
    [sent] = upstream.sent
    assert sent.url == f"{OIP_ORIGIN}/v2/models/iris/generate"
    assert json.loads(sent.body) == body


def test_a_text_answer_is_kept_as_text_with_its_content_type() -> None:
    reply = Canned(200, "prêt".encode(), {"content-type": "text/plain; charset=utf-8"})
    caller, _, _ = make_caller(lambda _: reply)
    answer = run(caller, call("mls", "infer"))
    assert (answer.value, answer.content_type) == ("prêt", "text/plain; charset=utf-8")


def test_raw_bytes_are_sent_as_one_binary_bytes_tensor_named_input() -> None:
    caller, upstream, _ = make_caller(lambda _: json_answer(200, INFERENCE))
    data = b"\x89PNG\r\n\x1a\n\x00\xff"
    prediction = with_bytes("kserve", "infer", {"size": len(data), "content_type": "image/png"})
    run(caller, prediction, data)
    [sent] = upstream.sent
    assert sent.headers["content-type"] == "application/octet-stream"
    assert sent.headers["authorization"] == f"Bearer {OIP_TOKEN}"
    length = int(sent.headers["inference-header-content-length"])
    assert json.loads(sent.body[:length]) == {
        "inputs": [
            {
                "name": "input",
                "shape": [1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": 4 + len(data)},
            }
        ]
    }
    # A BYTES element in binary: its length, 4 bytes little-endian, then the bytes.
    assert sent.body[length:] == struct.pack("<I", len(data)) + data


def test_multipart_parts_become_tensors_named_by_their_fields() -> None:
    caller, upstream, _ = make_caller(lambda _: json_answer(200, INFERENCE))
    image, meta = b"\x00\x01\x02", "ünïcode".encode()
    parts = (
        {"name": "image", "filename": "a.bin", "size": len(image)},
        {"name": "meta", "size": len(meta), "content_type": "text/plain"},
        {"name": None, "size": 0},  # a part without a field name: the default name
    )
    run(caller, with_bytes("mls", "infer", *parts, multipart=True), image + meta)
    [sent] = upstream.sent
    length = int(sent.headers["inference-header-content-length"])
    inputs = json.loads(sent.body[:length])["inputs"]
    assert [(i["name"], i["parameters"]["binary_data_size"]) for i in inputs] == [
        ("image", 4 + len(image)),
        ("meta", 4 + len(meta)),
        ("input", 4),
    ]
    assert sent.body[length:] == b"".join(
        [struct.pack("<I", 3), image, struct.pack("<I", len(meta)), meta, struct.pack("<I", 0)]
    )


def test_bytes_to_generate_are_refused_before_anything_is_sent() -> None:
    caller, upstream, _ = make_caller(no_request)
    error = failure(caller, with_bytes("kserve", "generate", {"size": 3}), b"abc")
    assert isinstance(error, UnsupportedOperation)
    assert (error.status, error.code) == (422, "unsupported_operation")
    assert "`infer`" in error.msg
    assert "backend 'kserve' (oip)" in error.msg
    assert upstream.sent == []


# --- error statuses, for both protocols ---------------------------------------------------------

# (backend, operation) of each protocol that maps its errors with base.status_error.
TARGETS = [("kserve", "infer"), ("llm", "chat.completions")]
TOKENS = {"kserve": OIP_TOKEN, "llm": OPENAI_TOKEN}
NAMES = {"kserve": "backend 'kserve' (oip)", "llm": "backend 'llm' (openai)"}


def one_error(target: tuple[str, str], reply: Canned, **overrides: object) -> DispatchError:
    """The error of one attempt answered `reply` (no retries), checked for what all share:
    it names the backend, never its token, and the answer was closed."""
    caller, upstream, sleeps = make_caller(lambda _: reply, retry_max_attempts=1)
    error = failure(caller, call(target[0], target[1], **overrides))
    assert NAMES[target[0]] in error.msg
    assert TOKENS[target[0]] not in error.msg
    assert (len(upstream.sent), sleeps, reply.closed) == (1, [], True)
    return error


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("status", [400, 409, 413, 422])
def test_a_refused_input_is_422_with_the_backends_message(
    target: tuple[str, str], status: int
) -> None:
    reply = json_answer(status, {"error": "input 'x' has shape [3], expected [4]"})
    error = one_error(target, reply)
    assert isinstance(error, ModelRejectedInput)
    assert (error.status, error.code, error.retryable) == (422, "model_rejected_input", False)
    assert error.msg.endswith(
        f"rejected the input ({status}): input 'x' has shape [3], expected [4]"
    )


@pytest.mark.parametrize("target", TARGETS)
def test_404_is_model_not_found_naming_the_model(target: tuple[str, str]) -> None:
    reply = json_answer(404, {"error": "Model with name missing does not exist."})
    error = one_error(target, reply, model_name="missing")
    assert isinstance(error, ModelNotFound)
    assert (error.status, error.code) == (404, "model_not_found")
    assert "has no model 'missing' (404): Model with name missing does not exist." in error.msg


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_are_backend_auth_rejected(
    target: tuple[str, str], status: int
) -> None:
    error = one_error(target, json_answer(status, {"error": "bad key"}))
    assert isinstance(error, BackendAuthRejected)
    assert (error.status, error.code, error.retryable) == (502, "backend_auth_rejected", False)
    assert f"refused the credentials ({status}): bad key" in error.msg
    assert "BACKENDS" in error.msg  # where the operator fixes it


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    ("status", "said"), [(429, "is rate limiting (429)"), (503, "is unavailable (503)")]
)
def test_busy_is_retryable_unavailable_with_retry_after_seconds(
    target: tuple[str, str], status: int, said: str
) -> None:
    reply = json_answer(status, {"error": "slow down"}, **{"retry-after": "7"})
    error = one_error(target, reply)
    assert isinstance(error, BackendUnavailable)
    assert (error.status, error.code, error.retryable) == (503, "backend_unavailable", True)
    assert error.retry_after == 7.0
    assert f"{said}: slow down" in error.msg


@pytest.mark.parametrize("target", TARGETS)
def test_retry_after_as_an_http_date(target: tuple[str, str]) -> None:
    when = formatdate(time.time() + 20, usegmt=True)  # a whole second, so 19 < x <= 20
    error = one_error(target, json_answer(503, {}, **{"retry-after": when}))
    assert isinstance(error, BackendUnavailable)
    assert error.retry_after is not None
    assert 18.5 < error.retry_after <= 20.5


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("value", [None, "", "soon", "-3"])
def test_retry_after_missing_or_unusable(target: tuple[str, str], value: str | None) -> None:
    headers = {} if value is None else {"retry-after": value}
    error = one_error(target, json_answer(503, {"error": "busy"}, **headers))
    assert isinstance(error, BackendUnavailable)
    assert error.retry_after == (0.0 if value == "-3" else None)  # a negative delay: no wait


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("status", [500, 501, 502, 504, 599])
def test_a_server_error_never_forwards_the_servers_text(
    target: tuple[str, str], status: int
) -> None:
    # KServe's 500 quotes the input it choked on: nothing of it may reach the message.
    echo = {"error": "cannot reshape s3cret-input-value into [4]", "detail": "s3cret-input-value"}
    error = one_error(target, json_answer(status, echo), body={"inputs": "s3cret-input-value"})
    assert isinstance(error, BackendFailed)
    assert (error.status, error.code, error.retryable) == (502, "backend_error", False)
    assert "s3cret" not in error.msg
    assert "reshape" not in error.msg
    assert f"failed ({status}); see the backend's log" in error.msg


@pytest.mark.parametrize("target", TARGETS)
def test_a_redirect_is_not_followed(target: tuple[str, str]) -> None:
    reply = Canned(307, b"", {"location": "http://169.254.169.254/latest/meta-data"})
    error = one_error(target, reply)
    assert isinstance(error, BackendFailed)
    assert "redirect (307)" in error.msg
    assert "169.254" not in error.msg


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("status", [400, 401, 404, 429, 503])
def test_a_server_echoing_the_token_gets_it_redacted(target: tuple[str, str], status: int) -> None:
    token = TOKENS[target[0]]
    reply = json_answer(status, {"error": f"token 'Bearer {token}' is not {token}"})
    error = one_error(target, reply)  # checks the token is not in the message
    assert "token 'Bearer [redacted]' is not [redacted]" in error.msg


@pytest.mark.parametrize("target", TARGETS)
def test_a_token_straddling_the_message_cut_is_redacted_whole(target: tuple[str, str]) -> None:
    token = TOKENS[target[0]]
    # The message is cut at 500 characters, inside the token: redacted before the cut, no
    # prefix of it remains.
    error = one_error(target, json_answer(401, {"error": "x" * 490 + " " + token}))
    assert token[:8] not in error.msg
    assert "x" * 490 + " [redac" in error.msg


def test_a_backend_without_a_token_redacts_nothing() -> None:
    caller, _, _ = make_caller(lambda _: json_answer(400, {"error": "bad"}), retry_max_attempts=1)
    error = failure(caller, call("mls", "infer"))
    assert error.msg == f"backend 'mls' (oip) at {OIP_ORIGIN} rejected the input (400): bad"


def test_an_error_message_is_at_most_500_characters_of_the_servers() -> None:
    caller, _, _ = make_caller(lambda _: Canned(400, b"  " + b"y" * 2000), retry_max_attempts=1)
    error = failure(caller, call("mls", "infer"))
    assert error.msg.partition("(400): ")[2] == "y" * 500
