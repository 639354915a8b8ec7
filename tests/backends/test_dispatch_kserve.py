"""The dispatcher in front of a real KServe 0.21 ModelServer (`digest`, `sum`) vs direct calls.

Bytes: every form docs/api.md lists for bytes (a multipart file, a raw body with its
Content-Type, a JSON `data` URI) goes to `digest` as a BYTES tensor of shape [1] with the
binary tensor data extension; `digest` answers the sha256 and length of what it received, so
an answer equal to hashlib's of the bytes sent proves the bytes arrived unchanged. The whole
answer is also compared with KServe's to the same binary request sent directly (all but `id`:
KServe makes one up for a request without). One payload is over the 64 KiB claim-check size,
so it travels through Redis apart from the message. JSON: `sum` (and `digest` with JSON
strings) equal the direct answer exactly, a fixed request `id` echoed. Errors: KServe's 400 ->
422 model_rejected_input with its message, 404 -> 404 model_not_found, and its 500 for
non-UTF-8 bytes (whose message quotes them) -> 502 without any of it. The client's X-Request-ID
reaches KServe (its latency log line names the request id it received).

One stack for the module: backend `ks` (the default), this KServe.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devstack import wait_until
from tests.backends.stack import BackendStack, backend, backend_stack
from tests.support.servers import kserve as kserve_support
from tests.support.servers.running import RunningServer

pytestmark = pytest.mark.e2e

TEXT = "h\u00e9llo, \u2713 model dispatcher\n".encode()
CLAIM_CHECKED = ("0123456789abcdef\u00e9\n" * 8000).encode()  # ~140 KiB, over 64 KiB


@pytest.fixture(scope="module")
def dispatcher(
    kserve_server: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackendStack]:
    root = tmp_path_factory.mktemp("dispatch-kserve")
    with backend_stack(root, {"ks": backend(kserve_server, "oip")}, default="ks") as stack:
        yield stack


def without_id(answer: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in answer.items() if key != "id"}


def direct_digest(server: RunningServer, data: bytes, tensor: str) -> dict[str, Any]:
    """KServe's answer to `data` as one binary BYTES tensor named `tensor`, shape [1]."""
    raw = kserve_support.bytes_tensor_raw([data])
    request, headers = kserve_support.binary_request([(tensor, "BYTES", [1], raw)])
    response = kserve_support.post_binary(server, "digest", request, headers)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def digest_of(answer: dict[str, Any]) -> list[tuple[str, int]]:
    outputs = {output["name"]: output["data"] for output in answer["outputs"]}
    return list(zip(outputs["sha256"], outputs["length"], strict=True))


def check_digest(
    done: dict[str, Any], server: RunningServer, data: bytes, tensor: str = "input"
) -> None:
    answer = done["prediction_value"]
    assert digest_of(answer) == [(hashlib.sha256(data).hexdigest(), len(data))]
    assert without_id(answer) == without_id(direct_digest(server, data, tensor))
    assert (done["backend"], done["model_name"]) == ("ks", "digest")


def raw_body(dispatcher: BackendStack, data: bytes, content_type: str) -> httpx.Response:
    return dispatcher.http.post(
        "/dispatch_model",
        params={"model_name": "digest", "backend": "ks"},
        content=data,
        headers={"content-type": content_type},
    )


def test_a_raw_body_arrives_as_a_bytes_tensor(
    dispatcher: BackendStack, kserve_server: RunningServer
) -> None:
    done = dispatcher.succeeded(raw_body(dispatcher, TEXT, "text/plain; charset=utf-8"))
    check_digest(done, kserve_server, TEXT)


def test_a_claim_checked_raw_body_arrives_whole(
    dispatcher: BackendStack, kserve_server: RunningServer
) -> None:
    done = dispatcher.succeeded(raw_body(dispatcher, CLAIM_CHECKED, "application/octet-stream"))
    check_digest(done, kserve_server, CLAIM_CHECKED)


def test_a_multipart_file_is_a_tensor_named_like_its_part(
    dispatcher: BackendStack, kserve_server: RunningServer
) -> None:
    response = dispatcher.http.post(
        "/dispatch_model",
        data={"model_name": "digest", "backend": "ks"},
        files={"document": ("note.txt", TEXT, "text/plain")},
    )
    check_digest(dispatcher.succeeded(response), kserve_server, TEXT, tensor="document")
    # Two files are two tensors: `digest` takes one, and says so (KServe's 400).
    two = dispatcher.http.post(
        "/dispatch_model",
        data={"model_name": "digest"},
        files=[("a", ("a.txt", b"one", "text/plain")), ("b", ("b.txt", b"two", "text/plain"))],
    )
    assert two.status_code == 422, two.text
    error = two.json()
    assert error["code"] == "model_rejected_input"
    assert error["msg"].startswith("backend 'ks' (oip) at http://127.0.0.1:")
    assert "(400): digest takes one input tensor, got 2" in error["msg"]


def test_a_data_uri_is_decoded_and_sent_as_bytes(
    dispatcher: BackendStack, kserve_server: RunningServer
) -> None:
    uri = "data:text/plain;base64," + base64.b64encode(TEXT).decode()
    response = dispatcher.dispatch({"model_name": "digest", "backend": "ks", "data": uri})
    check_digest(dispatcher.succeeded(response), kserve_server, TEXT)


def test_json_tensors_answer_as_kserve_does(
    dispatcher: BackendStack, kserve_server: RunningServer
) -> None:
    summed = {
        "id": "sum-1",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4.5]}],
    }
    strings = {
        "id": "digest-1",
        "inputs": [{"name": "data", "datatype": "BYTES", "shape": [2], "data": ["a", "b\u00e9"]}],
    }
    answers: dict[str, dict[str, Any]] = {}
    for model, request in (("sum", summed), ("digest", strings)):
        direct = kserve_support.post_infer(kserve_server, model, request)
        assert direct.status_code == 200, direct.text
        done = dispatcher.succeeded(dispatcher.dispatch({"model_name": model, "input": request}))
        answers[model] = done["prediction_value"]
        assert answers[model] == direct.json()
    assert answers["sum"]["outputs"][0]["data"] == [10.5]
    assert answers["sum"]["id"] == "sum-1"
    assert digest_of(answers["digest"]) == [
        (hashlib.sha256(text.encode()).hexdigest(), len(text.encode())) for text in ("a", "b\u00e9")
    ]


def test_kserve_errors_map_as_the_contract_says(
    dispatcher: BackendStack, kserve_server: RunningServer
) -> None:
    wrong_type = {"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [1]}]}
    direct = kserve_support.post_infer(kserve_server, "sum", wrong_type)
    assert (direct.status_code, direct.json()) == (400, {"error": "sum takes FP32, not INT32"})
    rejected = dispatcher.dispatch({"model_name": "sum", "input": wrong_type})
    assert rejected.status_code == 422, rejected.text
    assert rejected.json()["code"] == "model_rejected_input"
    assert "'ks' (oip)" in rejected.json()["msg"]
    assert "(400): sum takes FP32, not INT32" in rejected.json()["msg"]

    unknown = dispatcher.dispatch({"model_name": "nope", "input": wrong_type})
    assert unknown.status_code == 404, unknown.text
    assert unknown.json()["code"] == "model_not_found"
    assert "Model with name nope does not exist." in unknown.json()["msg"]


def test_bytes_kserve_cannot_decode_are_a_502_that_quotes_none_of_them(
    dispatcher: BackendStack, kserve_server: RunningServer
) -> None:
    data = b"\xff\xfe\x80 not utf-8"
    raw = kserve_support.bytes_tensor_raw([data])
    request, headers = kserve_support.binary_request([("input", "BYTES", [1], raw)])
    direct = kserve_support.post_binary(kserve_server, "digest", request, headers)
    assert direct.status_code == 500
    assert "not utf-8" in direct.text  # KServe's message quotes the payload
    response = raw_body(dispatcher, data, "application/octet-stream")
    assert response.status_code == 502, response.text
    error = response.json()
    assert error["code"] == "backend_error"
    assert "'ks' (oip)" in error["msg"]
    assert "failed (500)" in error["msg"]
    assert "utf-8" not in error["msg"].lower()


def test_the_request_id_reaches_kserve(
    dispatcher: BackendStack, kserve_server: RunningServer
) -> None:
    mine = f"ks-{uuid.uuid4()}"
    response = dispatcher.http.post(
        "/dispatch_model",
        params={"model_name": "digest"},
        content=TEXT,
        headers={"content-type": "text/plain", "x-request-id": mine},
    )
    assert response.headers["x-request-id"] == mine
    dispatcher.succeeded(response)
    # KServe logs a latency line per request, `requestId: <its X-Request-ID header>`.
    wait_until(
        lambda: f"requestId: {mine}," in kserve_server.log_path.read_text(),
        10,
        "KServe to log the request id",
    )


def test_backends_and_ready_report_kserve(dispatcher: BackendStack) -> None:
    info = dispatcher.backend_list()["ks"]
    assert (info["protocol"], info["health"], info["default"]) == ("oip", "ok", True)
    assert sorted(info["models"]) == ["digest", "sum"]
    assert info["takes_bytes"] is True  # KServe reads the extension without announcing it
    ready = dispatcher.http.get("/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["ks"] == "ok"
