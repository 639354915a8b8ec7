"""Bad inputs in each form: 422 naming what to fix; oversize: 413 before anything is stored."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devstack import RedisServer, TorchServe
from shared.payloads import Part, multipart_size
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

LIMIT = 100_000
OCTETS = {"content-type": "application/octet-stream"}


@pytest.fixture(scope="module")
def http(
    redis_server: RedisServer, torchserve: TorchServe, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    factory = StackFactory(redis_server, torchserve, tmp_path_factory.mktemp("inputs-errors"))
    with factory.client(env={"MAX_BODY_BYTES": str(LIMIT)}) as client:
        yield client


def explained(response: httpx.Response, status: int, *fragments: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == ("payload_too_large" if status == 413 else "invalid_request")
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
