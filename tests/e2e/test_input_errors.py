"""Bad inputs in each form: 422 naming what to fix; oversize: 413 before anything is stored.
The same for the backends: an unknown backend or operation, a body the protocol refuses, bytes
a backend cannot take (the OIP and OpenAI servers are stubs: the API asks them only what it asks
them itself; the workers' calls to real ones are tests/backends)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devstack import RedisServer, TorchServe
from shared.payloads import Part, multipart_size
from tests.support.backend_stub import BackendStub, oip_stub, openai_stub
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

LIMIT = 100_000
OCTETS = {"content-type": "application/octet-stream"}


@pytest.fixture(scope="module")
def stubs() -> Iterator[dict[str, BackendStub]]:
    """The model servers of the module's BACKENDS: only what the API asks them itself."""
    found = {
        "oipbin": oip_stub(extensions=["binary_tensor_data"], name="triton"),
        "oipjson": oip_stub(extensions=[], name="mlserver"),
        "llm": openai_stub(["qwen"]),
    }
    for stub in found.values():
        stub.start()
    yield found
    for stub in found.values():
        stub.stop()


@pytest.fixture(scope="module")
def http(
    redis_server: RedisServer,
    torchserve: TorchServe,
    tmp_path_factory: pytest.TempPathFactory,
    stubs: dict[str, BackendStub],
) -> Iterator[httpx.Client]:
    factory = StackFactory(redis_server, torchserve, tmp_path_factory.mktemp("inputs-errors"))
    backends = {
        "oipbin": {"url": stubs["oipbin"].url, "protocol": "oip"},
        "oipjson": {"url": stubs["oipjson"].url, "protocol": "oip"},
        "llm": {"url": stubs["llm"].url + "/v1", "protocol": "openai"},
    }
    env = {"MAX_BODY_BYTES": str(LIMIT), "BACKENDS": json.dumps(backends)}
    with factory.client(env=env) as client:
        yield client


def explained(
    response: httpx.Response, status: int, *fragments: str, code: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code or (
        code is None
        and body["code"] == ("payload_too_large" if status == 413 else "invalid_request")
    ), body
    for fragment in fragments:
        assert fragment in body["msg"], body
    return body


def uri(data: bytes, media: str = "application/octet-stream") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


@pytest.mark.parametrize(
    "data",
    [
        "not a data uri",
        "data:image/png,rawtext",  # not base64
        "data:image/png;base64,@@@@",
        "data:image/png;base64,AAA",  # bad padding
        "data:image/png;base64,AA AA",
        "data:image png;base64,AAAA",  # not a media type
        "data:image/png\r\nX-Evil: 1;base64,AAAA",
        "",
    ],
)
def test_bad_data_uris_are_422_naming_data(http: httpx.Client, data: str) -> None:
    response = http.post("/dispatch_model", json={"model_name": "digest", "data": data})
    explained(response, 422, "data")


def test_input_and_data_together_is_422(http: httpx.Client) -> None:
    body = {"model_name": "digest", "input": {"a": 1}, "data": uri(b"x")}
    explained(http.post("/dispatch_model", json=body), 422, "data", "not both")


@pytest.mark.parametrize(
    ("content", "content_type", "fragment"),
    [
        (
            b'--b\r\nContent-Disposition: form-data; name="model_name"\r\n\r\ndigest\r\n--b--\r\n',
            "multipart/form-data; boundary=b",
            "no file part",
        ),
        (b"--b--\r\n", "multipart/form-data; boundary=b", "no file part"),
        (b"", "multipart/form-data; boundary=b", "closing boundary"),
        (b"--b\r\nContent-Disposition: form-data; name=", "multipart/form-data; boundary=b", ""),
        (b"--b\r\n\r\nabc\r\n--b--\r\n", "multipart/form-data; boundary=b", "name"),
        (b"whatever", "multipart/form-data", "boundary"),
    ],
)
def test_empty_or_broken_multipart_is_422(
    http: httpx.Client, content: bytes, content_type: str, fragment: str
) -> None:
    response = http.post("/dispatch_model", content=content, headers={"content-type": content_type})
    explained(response, 422, fragment)


def test_missing_model_name_is_422_in_every_form(http: httpx.Client) -> None:
    forms = [
        http.post("/dispatch_model", json={"input": 1}),
        http.post("/dispatch_model", json={"data": uri(b"abc")}),
        http.post("/dispatch_model", data={"timeout": "5"}, files={"data": ("a", b"abc")}),
        http.post("/dispatch_model", content=b"abc", headers=OCTETS),
        http.post("/dispatch_model?model_version=1", content=b"abc", headers=OCTETS),
    ]
    for response in forms:
        explained(response, 422, "model_name")
    # The raw form says where the fields go.
    assert "query string" in forms[3].json()["msg"]


def test_bad_fields_are_422_in_the_query_and_the_form(http: httpx.Client) -> None:
    raw = http.post("/dispatch_model?model_name=a/b", content=b"x", headers=OCTETS)
    explained(raw, 422, "model_name")
    timeout = http.post("/dispatch_model?model_name=digest&timeout=soon", content=b"x")
    explained(timeout, 422, "timeout")
    form = http.post("/dispatch_model", data={"model_name": ".."}, files={"data": ("a", b"x")})
    explained(form, 422, "model_name")
    typed = http.post("/dispatch_model?model_name=digest&input_media_type=not-a-type", content=b"x")
    explained(typed, 422, "input_media_type")


@pytest.mark.parametrize("name", ["token", "password", "username"])
def test_credentials_are_refused_in_the_query_string(http: httpx.Client, name: str) -> None:
    response = http.post(
        f"/dispatch_model?model_name=digest&{name}=SECRET-in-url", content=b"x", headers=OCTETS
    )
    body = explained(response, 422, name, "URLs are logged")
    assert "SECRET-in-url" not in body["msg"]


def _keys(redis_server: RedisServer) -> set[bytes]:
    client = redis_server.client()
    return set(client.scan_iter("dispatch:task:*")) | set(client.scan_iter("dispatch:payload:*"))


def test_oversize_is_413_in_every_form_before_anything_is_stored(
    http: httpx.Client, redis_server: RedisServer
) -> None:
    before = _keys(redis_server)
    over = b"\x00" * (LIMIT + 1)
    wire = multipart_size([Part(name="data", filename="a", content_type="x/y", size=0)])
    responses = {
        "json": http.post(
            "/dispatch_model", json={"model_name": "digest", "input": "x" * (LIMIT + 1)}
        ),
        "data_uri": http.post("/dispatch_model", json={"model_name": "digest", "data": uri(over)}),
        "multipart": http.post(
            "/dispatch_model",
            data={"model_name": "digest"},
            files={"data": ("a", b"\x00" * (LIMIT - wire + 1), "x/y")},
        ),
        "raw": http.post("/dispatch_model?model_name=digest", content=over, headers=OCTETS),
        "raw_chunked": http.post(
            "/dispatch_model?model_name=digest",
            content=iter([b"\x00" * 4096] * (LIMIT // 4096 + 2)),
            headers=OCTETS,
        ),
    }
    for form, response in responses.items():
        assert response.status_code == 413, (form, response.text)
        explained(response, 413, "MAX_BODY_BYTES", str(LIMIT))
    assert _keys(redis_server) == before


def test_payloads_at_the_limit_are_accepted(http: httpx.Client) -> None:
    exact = b"\x01" * LIMIT
    wire = multipart_size([Part(name="data", filename="a", content_type="x/y", size=0)])
    responses = [
        http.post("/dispatch_model", json={"model_name": "digest", "data": uri(exact)}),
        http.post("/dispatch_model?model_name=digest", content=exact, headers=OCTETS),
        http.post(
            "/dispatch_model",
            data={"model_name": "digest"},
            files={"data": ("a", b"\x01" * (LIMIT - wire), "x/y")},
        ),
    ]
    for response in responses:
        assert response.status_code == 200, response.text


# --- backends: each refusal a 422 naming the field, nothing queued ------------------------------

QUEUES = ("dispatch.interactive", "dispatch", "dispatch.batch")
OIP = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def _queued(redis_server: RedisServer) -> tuple[int, int]:
    """Messages in the queues and task records: what a refused request must leave unchanged."""
    client = redis_server.client()
    return sum(client.llen(q) for q in QUEUES), len(list(client.scan_iter("dispatch:task:*")))


def _forms(http: httpx.Client, fields: dict[str, str], body: Any = None) -> list[httpx.Response]:
    """The request in JSON (with `body` as input, else a data URI), multipart and a raw body."""
    json_body = {"model_name": "m", **fields}
    json_body.update({"input": body} if body is not None else {"data": uri(b"abc")})
    return [
        http.post("/dispatch_model", json=json_body),
        http.post(
            "/dispatch_model", data={"model_name": "m", **fields}, files={"data": ("a", b"x")}
        ),
        http.post(
            "/dispatch_model", params={"model_name": "m", **fields}, content=b"x", headers=OCTETS
        ),
    ]


@pytest.mark.parametrize(
    ("fields", "code", "fragments"),
    [
        (
            {"backend": "nope"},
            "unknown_backend",
            ["backend: 'nope' is not configured", "llm, oipbin, oipjson, torchserve"],
        ),
        ({"backend": ""}, "unknown_backend", ["backend: '' is not configured"]),
        (
            {"backend": "oipbin", "operation": "predictions"},
            "unsupported_operation",
            ["operation: 'predictions'", "infer, generate"],
        ),
        (
            {"operation": "infer"},
            "unsupported_operation",
            ["backend 'torchserve'", "predictions, explanations"],
        ),
        ({"backend": "llm"}, "unsupported_operation", ["'llm' (openai) takes JSON, not bytes"]),
        (
            {"backend": "oipjson"},
            "unsupported_operation",
            ["'oipjson' (oip) cannot take bytes", "binary_tensor_data"],
        ),
        (
            {"backend": "oipbin", "operation": "generate"},
            "unsupported_operation",
            ["bytes go to", "operation infer"],
        ),
    ],
)
def test_bad_backends_and_bytes_they_cannot_take_are_422_in_every_form(
    http: httpx.Client,
    redis_server: RedisServer,
    fields: dict[str, str],
    code: str,
    fragments: list[str],
) -> None:
    before = _queued(redis_server)
    for response in _forms(http, fields):
        explained(response, 422, *fragments, code=code)
    assert _queued(redis_server) == before


@pytest.mark.parametrize(
    ("fields", "body", "fragments"),
    [
        ({"backend": "oipbin"}, {"inputs": []}, ["input.inputs", "non-empty list"]),
        (
            {"backend": "oipjson"},
            {"inputs": [{**OIP["inputs"][0], "datatype": "FLOAT"}]},
            ["input.inputs[0].datatype", "FP32"],
        ),
        (
            {"backend": "oipjson"},
            {"inputs": [{**OIP["inputs"][0], "shape": [-1]}]},
            ["input.inputs[0].shape"],
        ),
        ({"backend": "llm"}, {"messages": [{"content": "no role"}]}, ["input.messages[0]", "role"]),
        ({"backend": "llm", "operation": "completions"}, {"text": "x"}, ["input.prompt: required"]),
        (
            {"backend": "llm", "operation": "embeddings"},
            ["a"],
            ["input: backend 'llm' (openai) takes a JSON object"],
        ),
    ],
)
def test_a_body_the_protocol_refuses_is_422_naming_the_field(
    http: httpx.Client,
    redis_server: RedisServer,
    fields: dict[str, str],
    body: Any,
    fragments: list[str],
) -> None:
    before = _queued(redis_server)
    response = http.post("/dispatch_model", json={"model_name": "m", **fields, "input": body})
    explained(response, 422, *fragments)
    assert _queued(redis_server) == before


def test_streaming_and_missing_inputs_are_refused_before_queueing(
    http: httpx.Client, redis_server: RedisServer
) -> None:
    before = _queued(redis_server)
    streaming = {"model_name": "qwen", "backend": "llm", "input": {**CHAT, "stream": True}}
    explained(
        http.post("/dispatch_model", json=streaming),
        422,
        "input.stream: set the request's own stream field instead",
        code="unsupported_operation",
    )
    for fields in ({"backend": "oipbin"}, {"backend": "llm", "max_model_page": 2}):
        missing = http.post("/dispatch_model", json={"model_name": "m", **fields})
        explained(missing, 422, "input: required with backend")
    targeted = {"model_name": "m", "backend": "oipbin", "input": OIP, "host": "127.0.0.1"}
    explained(http.post("/dispatch_model", json=targeted), 422, "host/port/http_protocol")
    assert _queued(redis_server) == before


def test_a_batch_lists_each_item_a_backend_refuses_and_queues_none(
    http: httpx.Client, redis_server: RedisServer
) -> None:
    before = _queued(redis_server)
    items = [
        {"custom_id": "ok", "model_name": "m", "backend": "oipbin", "input": OIP},
        {"custom_id": "who", "model_name": "m", "backend": "nope", "input": 1},
        {"custom_id": "op", "model_name": "m", "backend": "llm", "operation": "x", "input": CHAT},
        {"custom_id": "bytes", "model_name": "m", "backend": "oipjson", "data": uri(b"x")},
        {"custom_id": "body", "model_name": "m", "backend": "llm", "input": {"messages": []}},
    ]
    response = http.post("/batches", json={"requests": items})
    assert response.status_code == 422, response.text
    errors = {e["custom_id"]: e["code"] for e in response.json()["errors"]}
    assert errors == {
        "who": "unknown_backend",
        "op": "unsupported_operation",
        "bytes": "unsupported_operation",
        "body": "invalid_request",
    }
    assert _queued(redis_server) == before


def test_what_a_backend_takes_is_queued_and_names_its_backend(http: httpx.Client) -> None:
    accepted = [
        http.post(
            "/dispatch_model?wait=0", json={"model_name": "m", "backend": "oipbin", "input": OIP}
        ),
        http.post(
            "/dispatch_model?wait=0", json={"model_name": "qwen", "backend": "llm", "input": CHAT}
        ),
        http.post(
            "/dispatch_model",
            params={"wait": 0, "model_name": "m", "backend": "oipbin"},
            content=b"x",
            headers=OCTETS,
        ),
        http.post(
            "/dispatch_model?wait=0",
            data={"model_name": "m", "backend": "oipbin"},
            files={"data": ("a", b"x")},
        ),
        http.post(
            "/dispatch_model?wait=0",
            json={
                "model_name": "m",
                "backend": "oipbin",
                "operation": "generate",
                "input": {"text_input": "hi"},
            },
        ),
    ]
    for response in accepted:
        assert response.status_code == 202, response.text
    views = [http.get(r.headers["location"], params={"wait": 20}).json() for r in accepted]
    assert [v["backend"] for v in views] == ["oipbin", "llm", "oipbin", "oipbin", "oipbin"]
    assert [v["operation"] for v in views] == [None, None, None, None, "generate"]
    assert all(v["status"] not in ("queued", "running") for v in views), views
