"""The OpenAPI document of the in-process app (no Redis): every `$ref` resolves, the constraints
the server enforces are in it, and its hand-written patterns accept exactly what the server does.
The fuzzer that checks it against the running server: tests/security/test_fuzz.py."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest

from api.host_pattern import HOST_PATTERN
from api.idempotency import parse_key
from api.inputs import DATA_URI_PATTERN, MEDIA_TYPE, decode_data_uri
from api.main import create_app
from api.targets import resolve_origin
from shared.errors import DispatchError
from shared.models import PredictionRequest
from shared.settings import Settings

KEY = "openapi-test-key-1"


def document(**overrides: Any) -> dict[str, Any]:
    settings = Settings(_env_file=None, **overrides)
    openapi: dict[str, Any] = create_app(settings).openapi()
    return openapi


def request(settings: Settings, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request to the in-process app, without its lifespan (no Redis needed)."""

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(send())


def refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in refs(item)]
    return []


def resolve(spec: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = spec
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_every_ref_resolves() -> None:
    spec = document()
    found = refs(spec)
    assert "#/components/schemas/PredictionRequest" in found
    assert "#/components/schemas/Priority" in found  # PredictionRequest's own reference
    for ref in found:
        assert isinstance(resolve(spec, ref), dict), ref
    assert "$defs" not in str(spec)


def test_the_document_carries_the_servers_limits() -> None:
    spec = document(dispatch_max_timeout=120, dispatch_default_timeout=60, batch_max_requests=500)
    request = spec["components"]["schemas"]["PredictionRequest"]
    timeout = next(b for b in request["properties"]["timeout"]["anyOf"] if "maximum" in b)
    assert timeout["maximum"] == 120
    batch = spec["paths"]["/batches"]["post"]["requestBody"]["content"]["application/json"]
    requests = batch["schema"]["properties"]["requests"]
    assert (requests["minItems"], requests["maxItems"]) == (1, 500)
    model_name = request["properties"]["model_name"]
    assert model_name["pattern"] == r"^[A-Za-z0-9_.\-]{1,128}$"
    assert model_name["not"] == {"pattern": r"^\.+$"}


def test_each_form_says_what_it_requires() -> None:
    operation = document()["paths"]["/dispatch_model"]["post"]
    content = operation["requestBody"]["content"]
    assert content["multipart/form-data"]["schema"]["required"] == ["model_name", "data"]
    query = {p["name"]: p for p in operation["parameters"] if p["in"] == "query"}
    assert "required there" in query["model_name"]["description"]
    # A form field is text and absent when unset, never null.
    assert "anyOf" not in query["timeout"]["schema"]
    assert query["timeout"]["schema"]["type"] == "number"


def test_idempotency_key_pattern_is_the_servers_rule() -> None:
    [header] = [
        p
        for p in document()["paths"]["/dispatch_model"]["post"]["parameters"]
        if p["name"] == "Idempotency-Key"
    ]
    pattern = re.compile(header["schema"]["pattern"])
    samples = [
        "k", "x" * 255, "x" * 256, '"quoted key"', '"' + "y" * 255 + '"', '"' + "y" * 256 + '"',
        '"a\\"b"', '"a\\\\b"', '"a\\b"', '""', "", "has space", 'a"b', "a\\b", "caf\u00e9",
        "550e8400-e29b-41d4-a716-446655440000",
    ]  # fmt: skip
    for sample in samples:
        try:
            parse_key([sample])
            accepted = True
        except DispatchError:
            accepted = False
        assert bool(pattern.search(sample)) == accepted, sample


def test_data_uri_pattern_is_the_servers_rule() -> None:
    pattern = re.compile(DATA_URI_PATTERN)
    samples = [
        "data:image/png;base64,iVBORw0KGgo=", "data:;base64,", "DATA:text/plain;BASE64,QUJD",
        "data: image/png ;base64,QQ==", "data:text/plain; charset=utf-8;base64,QUI=",
        "data:image/png,abc", "data:image/png;base64,abc", "data:image/png;base64,QQ==\n",
        "data:image;base64,QQ==", "data:a/b;base64,QQ=", "data:a/b;base64,Q Q==", "data:",
        "nodata:a/b;base64,", "data:a/b;base64,QUJD====", "data:a/b;base64,QUJD==",
        "data:a/b;base64,QUI==", "data:a/b;base64,QQ===", "data:a/b;base64,=",
        "data:a/b;base64,QUJDQQ==QQ",
    ]  # fmt: skip
    for sample in samples:
        try:
            decode_data_uri(sample, 1 << 20)
            accepted = True
        except DispatchError:
            accepted = False
        assert bool(pattern.search(sample)) == accepted, sample


def test_a_media_type_ends_at_the_end_of_the_string() -> None:
    assert MEDIA_TYPE.match("image/png; q=1")
    assert not MEDIA_TYPE.match("image/png\n")  # would become a header line of its own


def test_host_pattern_is_what_the_target_check_parses() -> None:
    settings = Settings(_env_file=None)
    pattern = re.compile(HOST_PATTERN)
    samples = [
        "localhost", "10.0.0.1", "[::1]", "[2001:db8::8:800:200c:417a]", "[::ffff:1.2.3.4]",
        "[1:2:3:4:5:6:7:8]", "[0]", "[1:2:3]", "[1.2.3.4]", "[::1.2.3.256]", "[1::2::3]",
        "[1:2:3:4:5:6:7:8:9]", "[:1]", "a b", "host.example",
    ]  # fmt: skip
    for host in samples:
        try:
            resolve_origin(PredictionRequest(model_name="m", host=host), settings)
            parsed = True
        except DispatchError as refused:
            parsed = refused.status == 403  # a valid host, just not an allowed target
        except ValueError:
            parsed = False
        assert bool(pattern.search(host)) == parsed, host


@pytest.mark.parametrize("path", ["/tasks/abc", "/batches/abc"])
def test_a_405_allows_every_method_of_the_path(path: str) -> None:
    settings = Settings(_env_file=None, dispatcher_api_keys=KEY)
    response = request(settings, "PATCH", path, headers={"X-API-Key": KEY})
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET"
    assert response.json()["code"] == "method_not_allowed"


def test_a_405_of_a_single_method_path() -> None:
    response = request(Settings(_env_file=None), "GET", "/dispatch_model")
    assert (response.status_code, response.headers["allow"]) == (405, "POST")


def test_a_405_inside_the_docs_static_files_keeps_their_own_allow() -> None:
    response = request(Settings(_env_file=None), "POST", "/docs/static/swagger-ui.css")
    assert (response.status_code, response.headers["allow"]) == (405, "GET, HEAD")
