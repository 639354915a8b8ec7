"""Malformed and hostile requests against the running API: always a 4xx that says what to fix."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from devstack import RedisServer, TorchServe
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

MAX_BODY = 4096
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def http(
    redis_server: RedisServer, torchserve: TorchServe, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    factory = StackFactory(redis_server, torchserve, tmp_path_factory.mktemp("bad-input"))
    env = {"MAX_BODY_BYTES": str(MAX_BODY), "DISPATCH_DEFAULT_WAIT": "10"}
    with factory.client(env=env) as client:
        yield client


def _assert_explained(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status
    assert body["code"]
    for fragment in fragments:
        assert fragment in body["msg"], body


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"input": 1}, "model_name"),
        ({"model_name": None}, "model_name"),
        ({"model_name": 5}, "model_name"),
        ({"model_name": ["echo"]}, "model_name"),
        ({"model_name": {"name": "echo"}}, "model_name"),
        ({"model_name": "a/b"}, "model_name"),
        ({"model_name": "../echo"}, "model_name"),
        ({"model_name": ".."}, "model_name"),
        ({"model_name": "."}, "model_name"),
        ({"model_name": "echo%2F..%2Fmodels"}, "model_name"),
        ({"model_name": "%2e%2e"}, "model_name"),
        ({"model_name": "a b"}, "model_name"),
        ({"model_name": "echo\n"}, "model_name"),
        ({"model_name": "echo\u0000"}, "model_name"),
        ({"model_name": "\u00e9cho"}, "model_name"),
        ({"model_name": "x" * 300}, "model_name"),
        ({"model_name": ""}, "model_name"),
        ({"model_name": "echo", "model_version": "../2.0"}, "model_version"),
        ({"model_name": "echo", "model_version": 2}, "model_version"),
        ({"model_name": "echo", "timeout": "soon"}, "timeout"),
        ({"model_name": "echo", "timeout": -1}, "timeout"),
        ({"model_name": "echo", "timeout": 0}, "timeout"),
        ({"model_name": "echo", "timeout": 10**400}, "timeout"),
        ({"model_name": "echo", "timeout": [1]}, "timeout"),
        ({"model_name": "echo", "port": "x"}, "port"),
        ({"model_name": "echo", "port": 0}, "port"),
        ({"model_name": "echo", "port": 70000}, "port"),
        ({"model_name": "echo", "port": 1.5}, "port"),
        ({"model_name": "echo", "host": "evil.example/x"}, "host"),
        ({"model_name": "echo", "host": "user@127.0.0.1"}, "host"),
        ({"model_name": "echo", "host": "a b"}, "host"),
        ({"model_name": "echo", "host": "[0]"}, "host"),  # found by the fuzz test: was a 500
        ({"model_name": "echo", "host": "[1:2:3]"}, "host"),
        ({"model_name": "echo", "http_protocol": "ftp"}, "http_protocol"),
        ({"model_name": "echo", "username": 5}, "username"),
        ({"model_name": "echo", "token": {"k": "v"}}, "token"),
    ],
)
def test_invalid_fields_are_422_naming_the_field(
    http: httpx.Client, body: dict[str, object], fragment: str
) -> None:
    _assert_explained(http.post("/dispatch_model", json=body), 422, fragment)


@pytest.mark.parametrize(
    ("content", "headers", "fragment"),
    [
        (b"{not json", JSON, "JSON"),
        (b'{"model_name": "echo",}', JSON, "JSON"),
        (b"", JSON, "body"),
        (b"null", JSON, "JSON object"),
        (b"[1, 2]", JSON, "JSON object"),
        (b'"echo"', JSON, "JSON object"),
        (b"42", JSON, "JSON object"),
        (b'{"model_name": "\xff\xfe"}', JSON, ""),
        (b"model_name=echo", {"content-type": "application/x-www-form-urlencoded"}, ""),
        (b'{"model_name": "echo"', {"content-type": "text/plain"}, ""),
        (b"\x00\x01\x02", {"content-type": "application/octet-stream"}, ""),
        (b"[" * 3000 + b"]" * 3000, JSON, ""),  # deeper than any parser's recursion limit
        (b'{"model_name": "echo", "input": ' + b"[" * 3000 + b"]" * 3000 + b"}", JSON, ""),
        (b'{"model_name": "echo", "input": NaN}', JSON, "input"),
        (b'{"model_name": "echo", "input": {"x": Infinity}}', JSON, "input"),
        (b'{"model_name": "echo", "max_model_page": -Infinity}', JSON, "max_model_page"),
        (b'{"model_name": "echo", "timeout": NaN}', JSON, "timeout"),
    ],
)
def test_malformed_bodies_are_4xx_with_a_message(
    http: httpx.Client, content: bytes, headers: dict[str, str], fragment: str
) -> None:
    response = http.post("/dispatch_model", content=content, headers=headers)
    assert 400 <= response.status_code < 500, response.text
    body = response.json()
    assert body["msg"]
    assert fragment in body["msg"]


def test_body_over_the_limit_is_413_with_content_length(http: httpx.Client) -> None:
    body = b'{"model_name": "echo", "input": "' + b"x" * MAX_BODY + b'"}'
    response = http.post("/dispatch_model", content=body, headers=JSON)
    _assert_explained(response, 413, "MAX_BODY_BYTES", str(MAX_BODY))


def test_body_over_the_limit_is_413_when_chunked(http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model_name": "echo", "input": "'
        for _ in range(MAX_BODY // 512 + 2):
            yield b"x" * 512
        yield b'"}'

    response = http.post("/dispatch_model", content=chunks(), headers=JSON)
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    _assert_explained(response, 413, "MAX_BODY_BYTES")


def test_a_lying_content_length_is_not_a_5xx(http: httpx.Client) -> None:
    """Content-Length says 10, far more follows: the API reads 10 bytes, which are no JSON."""
    host, port = str(http.base_url.host), int(http.base_url.port or 80)
    body = b'{"model_name": "echo", "input": "' + b"x" * (MAX_BODY * 2) + b'"}'
    head = (
        f"POST /dispatch_model HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        "Content-Length: 10\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        status_line = sock.makefile("rb").readline().decode()
    assert status_line.startswith("HTTP/1.1 4"), status_line


def test_body_at_the_limit_is_accepted(http: httpx.Client) -> None:
    prefix, suffix = b'{"model_name": "echo", "input": "', b'"}'
    body = prefix + b"x" * (MAX_BODY - len(prefix) - len(suffix)) + suffix
    assert len(body) == MAX_BODY
    response = http.post("/dispatch_model", content=body, headers=JSON)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "prefer",
    [
        "handling=strict, return=minimal",
        "wait=abc",
        "wait=-5",
        "wait=NaN",
        "wait=",
        "foo",
        "",
        ";;;,,,",
        "wait=1e999999",
        "\u00e9t\u00e9=1".encode(),
    ],
)
def test_unknown_prefer_values_are_ignored(http: httpx.Client, prefer: str | bytes) -> None:
    response = http.post(
        "/dispatch_model", json={"model_name": "echo", "input": 1}, headers={"Prefer": prefer}
    )
    assert response.status_code == 200, response.text
    assert response.json()["prediction_value"] == 1


@pytest.mark.parametrize(
    ("method", "path", "status", "fragment"),
    [
        ("POST", "/dispatch_model?wait=abc", 422, "wait"),
        ("POST", "/dispatch_model?wait=-1", 422, "wait"),
        ("POST", "/dispatch_model?wait=1e400", 422, "wait"),
        ("GET", "/tasks/" + "a" * 65, 422, "task_id"),
        ("GET", "/tasks/a%2F..%2F..", 404, "Not Found"),  # %2F decodes to /: no such route
        ("GET", "/tasks/%00", 422, "task_id"),
        ("GET", "/tasks/00000000-0000-0000-0000-000000000000?wait=x", 422, "wait"),
        ("DELETE", "/tasks/..%2F..", 404, "Not Found"),
        ("DELETE", "/tasks/...", 422, "task_id"),
        ("GET", "/dispatch_model", 405, "Method Not Allowed"),
        ("PUT", "/tasks/00000000-0000-0000-0000-000000000000", 405, "Method Not Allowed"),
        ("GET", "/no/such/path", 404, "Not Found"),
    ],
)
def test_bad_paths_queries_and_methods_are_4xx(
    http: httpx.Client, method: str, path: str, status: int, fragment: str
) -> None:
    response = http.request(method, path, json={"model_name": "echo"})
    _assert_explained(response, status, fragment)
