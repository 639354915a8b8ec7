"""A body checked against its backend's protocol (api/backend_inputs.py), the OpenAPI document's
account of the same rules (api/backend_schema.py) held to the server's verdict, and the bytes
rule asked of a real (stub) OIP server's metadata (api/backend_probe.py)."""

from __future__ import annotations

import asyncio
import base64
import copy
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from api.backend_inputs import OIP_DATATYPES, check_backend_input, check_body, check_stream
from api.backend_probe import BackendProbe
from api.inputs import decode_data_uri
from api.main import create_app
from api.targets import resolve_target
from devstack.processes import free_port
from shared.backends import Protocol, Target
from shared.errors import DispatchError, InvalidRequest, UnsupportedOperation
from shared.models import PredictionRequest
from shared.settings import Settings
from tests.support.backend_stub import BackendStub, oip_stub

BACKENDS = (
    '{"mls": {"url": "http://127.0.0.1:9100", "protocol": "oip"}, '
    '"llm": {"url": "http://127.0.0.1:9200/v1", "protocol": "openai"}}'
)
TENSOR = {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}
OIP = {"inputs": [TENSOR]}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
URI = "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(_env_file=None, backends=BACKENDS)


def verdict(body: dict[str, Any], settings: Settings, *, has_bytes: bool | None = None) -> str:
    """ "ok", or the code and message the server refuses the JSON dispatch `body` with."""
    try:
        request = PredictionRequest.model_validate(body)
        if request.data is not None:
            decode_data_uri(request.data, 1 << 20)
        target = resolve_target(request, settings)
        check_body(request, target, request.data is not None if has_bytes is None else has_bytes)
        if request.stream:
            check_stream(target)
    except ValidationError as error:
        return f"invalid_request: {error.errors()[0]['msg']}"
    except DispatchError as error:
        return f"{error.code}: {error.msg}"
    return "ok"


HOOK = "https://hooks.example.com/dispatch"


def with_input(backend: str, body: Any, **fields: Any) -> dict[str, Any]:
    return {"model_name": "m", "backend": backend, "input": body, **fields}


def tensor(**changes: Any) -> dict[str, Any]:
    held = {**TENSOR, **changes}
    return {"inputs": [{k: v for k, v in held.items() if v is not DROP}]}


DROP = object()

# (body, accepted): every rule of the module, each side of it.
CASES: list[tuple[dict[str, Any], bool]] = [
    # TorchServe: anything, as before.
    ({"model_name": "m", "input": [1, "x"]}, True),
    ({"model_name": "m"}, True),
    ({"model_name": "m", "backend": "torchserve", "operation": "explanations", "input": 1}, True),
    ({"model_name": "m", "data": URI}, True),
    ({"model_name": "m", "operation": "infer"}, False),
    ({"model_name": "m", "operation": ""}, False),
    ({"model_name": "m", "backend": ""}, False),
    ({"model_name": "m", "backend": "nope"}, False),
    # OIP infer.
    (with_input("mls", OIP), True),
    (with_input("mls", OIP, operation="infer"), True),
    (with_input("mls", {**OIP, "parameters": {"a": 1}, "id": "r1", "extra": 1}), True),
    (with_input("mls", {**OIP, "outputs": [{"name": "y", "parameters": {}}]}), True),
    (with_input("mls", tensor(shape=[2.0, 0])), True),
    (with_input("mls", tensor(shape=[])), True),
    (with_input("mls", tensor(data=None, parameters={"p": 1})), True),
    *[(with_input("mls", tensor(datatype=d)), True) for d in OIP_DATATYPES],
    ({"model_name": "m", "backend": "mls", "data": URI}, True),
    ({"model_name": "m", "backend": "mls"}, False),
    ({"model_name": "m", "backend": "mls", "max_model_page": 3}, False),
    (with_input("mls", None), False),
    (with_input("mls", [OIP]), False),
    (with_input("mls", {}), False),
    (with_input("mls", {"inputs": []}), False),
    (with_input("mls", {"inputs": "x"}), False),
    (with_input("mls", {"inputs": [1]}), False),
    *[(with_input("mls", tensor(**{field: DROP})), False) for field in TENSOR],
    (with_input("mls", tensor(name="")), False),
    (with_input("mls", tensor(name=3)), False),
    (with_input("mls", tensor(shape=[-1])), False),
    (with_input("mls", tensor(shape=[1.5])), False),
    (with_input("mls", tensor(shape=[True])), False),
    (with_input("mls", tensor(shape="1,3")), False),
    (with_input("mls", tensor(datatype="FLOAT")), False),
    (with_input("mls", tensor(datatype="fp32")), False),
    (with_input("mls", tensor(datatype=None)), False),
    (with_input("mls", tensor(parameters=[])), False),
    (with_input("mls", {**OIP, "parameters": "x"}), False),
    (with_input("mls", {**OIP, "parameters": None}), False),
    (with_input("mls", {**OIP, "id": 5}), False),
    (with_input("mls", {**OIP, "outputs": {}}), False),
    (with_input("mls", {**OIP, "outputs": [{}]}), False),
    (with_input("mls", {**OIP, "outputs": [{"name": ""}]}), False),
    (with_input("mls", {**OIP, "outputs": [{"name": "y", "parameters": 1}]}), False),
    (with_input("mls", OIP, host="127.0.0.1"), False),
    (with_input("mls", OIP, port=9100), False),
    (with_input("mls", OIP, http_protocol="http"), False),
    (with_input("mls", OIP, host=None, port=None), True),
    (with_input("mls", OIP, token="t"), False),  # its token is the configured one
    (with_input("mls", OIP, username="u", password="p"), False),
    (with_input("mls", OIP, token=None), True),
    (with_input("mls", OIP, model_version="v1"), True),
    (with_input("mls", OIP, operation="predictions"), False),
    # OIP generate.
    (with_input("mls", {"text_input": "hi"}, operation="generate"), True),
    (with_input("mls", {}, operation="generate"), True),
    (with_input("mls", "hi", operation="generate"), False),
    ({"model_name": "m", "backend": "mls", "operation": "generate", "data": URI}, False),
    # OpenAI.
    (with_input("llm", CHAT), True),
    (with_input("llm", {**CHAT, "stream": False, "model": "ignored"}), True),
    (with_input("llm", {**CHAT, "stream": "yes"}), True),  # the server's to refuse
    (with_input("llm", {**CHAT, "stream": True}), False),
    (with_input("llm", {"messages": []}), False),
    (with_input("llm", {"messages": {}}), False),
    (with_input("llm", {"messages": [{}]}), False),
    (with_input("llm", {"messages": [{"role": 1}]}), False),
    (with_input("llm", {"messages": ["hi"]}), False),
    (with_input("llm", {"prompt": "x"}), False),
    (with_input("llm", {"prompt": "x"}, operation="completions"), True),
    (with_input("llm", {"prompt": None}, operation="completions"), True),
    (with_input("llm", {"prompt": "x", "stream": True}, operation="completions"), False),
    (with_input("llm", CHAT, operation="completions"), False),
    (with_input("llm", {"input": ["a", "b"]}, operation="embeddings"), True),
    (with_input("llm", {"prompt": "a"}, operation="embeddings"), False),
    (with_input("llm", CHAT, operation="infer"), False),
    (with_input("llm", "hello"), False),
    (with_input("llm", CHAT, host="h"), False),
    (with_input("llm", CHAT, token="t"), False),
    (with_input("llm", CHAT, model_version="v1"), False),  # OpenAI has no versions
    (with_input("llm", CHAT, model_version=None), True),
    (with_input("torchserve", {"x": 1}, token="t", model_version="1.0"), True),
    ({"model_name": "m", "backend": "llm"}, False),
    ({"model_name": "m", "backend": "llm", "data": URI}, False),
    # The request's own `stream` (issue 18): every operation but embeddings streams.
    (with_input("llm", CHAT, stream=True), True),
    (with_input("llm", {"prompt": "x"}, operation="completions", stream=True), True),
    (with_input("llm", {"input": "a"}, operation="embeddings", stream=True), False),
    (with_input("llm", {"input": "a"}, operation="embeddings", stream=False), True),
    (with_input("mls", OIP, stream=True), True),
    (with_input("mls", {"text_input": "hi"}, operation="generate", stream=True), True),
    (with_input("torchserve", {"x": 1}, stream=True), True),
    ({"model_name": "m", "backend": "mls", "data": URI, "stream": True}, True),
    # task.output (coalesced outputs, shared/webhook_output.py) only for a streamed task.
    (with_input("torchserve", 1, webhook=HOOK, webhook_events=["task.output"]), False),
    (with_input("torchserve", 1, webhook=HOOK, webhook_events=["task.output"], stream=True), True),
    (with_input("torchserve", 1, webhook=HOOK, webhook_events=["task.failed"]), True),
]


def test_the_cases_cover_every_operation(settings: Settings) -> None:
    covered = set()
    for body, accepted in CASES:
        if accepted:
            request = PredictionRequest.model_validate(body)
            covered.add(resolve_target(request, settings).operation)
    assert covered == {op for b in settings.backend_map.values() for op in b.operations}


@pytest.mark.parametrize(("body", "accepted"), CASES)
def test_the_server_accepts_exactly_the_protocols_bodies(
    settings: Settings, body: dict[str, Any], accepted: bool
) -> None:
    assert (verdict(body, settings) == "ok") == accepted, verdict(body, settings)


@pytest.fixture(scope="module")
def validator(settings: Settings) -> Draft202012Validator:
    document = create_app(settings).openapi()
    root = {"$ref": "#/components/schemas/PredictionRequest", "components": document["components"]}
    return Draft202012Validator(root)


@pytest.mark.parametrize(("body", "accepted"), CASES)
def test_the_openapi_document_says_what_the_server_does(
    validator: Draft202012Validator, body: dict[str, Any], accepted: bool
) -> None:
    assert validator.is_valid(body) == accepted, list(validator.iter_errors(body))[:1]


FORMS: list[tuple[dict[str, str], bool]] = [
    ({}, True),
    ({"backend": "torchserve", "operation": "explanations"}, True),
    ({"backend": "mls"}, True),
    ({"backend": "mls", "operation": "infer"}, True),
    ({"backend": "mls", "operation": "generate"}, False),
    ({"backend": "llm"}, False),
    ({"backend": "llm", "operation": "completions"}, False),
    ({"operation": "infer"}, False),
    ({"backend": ""}, False),
    ({"backend": "nope"}, False),
]


@pytest.mark.parametrize(("fields", "accepted"), FORMS)
def test_bytes_forms_say_which_backends_take_bytes(
    settings: Settings, fields: dict[str, str], accepted: bool
) -> None:
    """The multipart schema (the query parameters share its fields) against the server."""
    document = create_app(settings).openapi()
    content = document["paths"]["/dispatch_model"]["post"]["requestBody"]["content"]
    form = Draft202012Validator(content["multipart/form-data"]["schema"])
    body = {"model_name": "m", **fields}
    assert form.is_valid({**body, "data": "bytes"}) == accepted
    assert (verdict(body, settings, has_bytes=True) == "ok") == accepted


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({"backend": "mls"}, ["input: required with backend 'mls' (oip)", '"inputs"']),
        ({"backend": "mls", "input": tensor(datatype="FLOAT")}, ["inputs[0].datatype", "FP32"]),
        ({"backend": "mls", "input": tensor(shape=[-1])}, ["input.inputs[0].shape", "[1, 3]"]),
        ({"backend": "mls", "input": tensor(name=DROP)}, ["input.inputs[0].name", "required"]),
        ({"backend": "llm", "input": {"messages": []}}, ["input.messages", "non-empty"]),
        ({"backend": "llm", "input": {**CHAT, "stream": True}}, ["input.stream", "stream field"]),
        ({"backend": "llm", "data": URI}, ["data:", "'llm' (openai) takes JSON"]),
        ({"backend": "mls", "operation": "x"}, ["operation: 'x'", "infer, generate"]),
        ({"backend": "nope"}, ["backend: 'nope' is not configured", "llm, mls, torchserve"]),
    ],
)
def test_each_refusal_names_the_field_and_what_to_send(
    settings: Settings, body: dict[str, Any], fragments: list[str]
) -> None:
    found = verdict({"model_name": "m", **body}, settings)
    for fragment in fragments:
        assert fragment in found, found


def test_codes_say_which_kind_of_refusal() -> None:
    settings = Settings(_env_file=None, backends=BACKENDS)
    codes = {
        verdict({"model_name": "m", **body}, settings).partition(":")[0]
        for body in ({"backend": "nope"}, {"backend": "mls", "operation": "x"})
    }
    assert codes == {"unknown_backend", "unsupported_operation"}
    streaming = verdict(with_input("llm", {**CHAT, "stream": True}), settings)
    assert streaming.startswith("unsupported_operation")
    assert verdict(with_input("mls", {}), settings).startswith("invalid_request")


# --- bytes to an OIP backend: what its server says ------------------------------------------


def _probe_for(url: str) -> tuple[BackendProbe, Settings, httpx.AsyncClient]:
    config = Settings(
        _env_file=None,
        backends=f'{{"mls": {{"url": "{url}", "protocol": "oip", "token": "TOKEN-b1"}}}}',
    )
    http = httpx.AsyncClient()
    return BackendProbe(http, config.backend_map), config, http


def _send_bytes(url: str, times: int = 1) -> list[str]:
    """Check a bytes request for backend mls `times` at once; each "ok" or the refusal."""

    async def run() -> list[str]:
        probe, config, http = _probe_for(url)
        request = PredictionRequest(model_name="m", backend="mls")
        target = resolve_target(request, config)

        async def one() -> str:
            try:
                await check_backend_input(request, target, True, probe.require_bytes)
            except UnsupportedOperation as refused:
                return refused.msg
            return "ok"

        try:
            return list(await asyncio.gather(*(one() for _ in range(times))))
        finally:
            await http.aclose()

    return asyncio.run(run())


def test_bytes_go_to_an_oip_server_that_announces_the_extension() -> None:
    with oip_stub(extensions=["model_repository", "binary_tensor_data"]) as stub:
        stub.delay = 0.2
        assert _send_bytes(stub.url, times=5) == ["ok"] * 5
        assert stub.calls("/v2") == 1  # one question for five concurrent requests
        assert stub.seen[0].headers["Authorization"] == "Bearer TOKEN-b1"


def test_bytes_to_an_oip_server_without_it_are_refused_naming_the_backend() -> None:
    with oip_stub(extensions=[], name="mlserver") as stub:
        [refused] = _send_bytes(stub.url)
    assert "backend 'mls' (oip) cannot take bytes" in refused
    assert "binary_tensor_data" in refused
    assert "TOKEN" not in refused


def test_kserve_reads_the_extension_without_announcing_it() -> None:
    with oip_stub(extensions=["model_repository_extension"], name="kserve") as stub:
        assert _send_bytes(stub.url) == ["ok"]


def test_a_server_whose_metadata_cannot_be_read_gets_the_bytes() -> None:
    """Accepted: the worker's call then fails (or not) as the server answers."""
    assert _send_bytes(f"http://127.0.0.1:{free_port()}") == ["ok"]
    with BackendStub({("GET", "/v2"): (500, {"error": "x"})}) as stub:
        assert _send_bytes(stub.url) == ["ok"]


def test_json_requests_never_ask_the_server() -> None:
    with oip_stub(extensions=[]) as stub:
        probe, config, http = _probe_for(stub.url)
        request = PredictionRequest(model_name="m", backend="mls", input=copy.deepcopy(OIP))
        target = resolve_target(request, config)
        asyncio.run(check_backend_input(request, target, False, probe.require_bytes))
        asyncio.run(http.aclose())
        assert stub.seen == []


def test_torchserve_targets_pass_untouched() -> None:
    target = Target("torchserve", Protocol.torchserve, "http://x:1", "predictions")

    async def never(_: Target) -> None:
        raise AssertionError("asked")

    asyncio.run(check_backend_input(PredictionRequest(model_name="m"), target, True, never))
    openai = Target("llm", Protocol.openai, "http://x:1", "chat.completions")
    with pytest.raises(InvalidRequest):
        check_body(PredictionRequest(model_name="m"), openai, False)
