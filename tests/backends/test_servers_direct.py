"""Each real model server, called directly: the ground truth the dispatcher's backends must match.

One deterministic inference per server (and what it answers to a wrong model or a broken body),
with the helpers of tests/support/servers/ that the dispatcher tests reuse for their expected
values.
"""

from __future__ import annotations

import hashlib
import math

# Aliased: the fixtures are named like the modules (`mlserver`).
from tests.support.servers import kserve as kserve_support
from tests.support.servers import llamacpp as llamacpp_support
from tests.support.servers import mlserver as mlserver_support
from tests.support.servers.running import RunningServer, client


def test_mlserver_answers_the_same_twice(mlserver: RunningServer) -> None:
    first = mlserver_support.infer(mlserver, outputs=("predict", "predict_proba"))
    second = mlserver_support.infer(mlserver, outputs=("predict", "predict_proba"))
    assert mlserver_support.without_id(first) == mlserver_support.without_id(second)
    outputs = {output["name"]: output for output in first["outputs"]}
    assert outputs["predict"]["data"] == [0, 2]  # setosa, virginica
    assert outputs["predict_proba"]["shape"] == [2, 3]
    assert first["model_name"] == "iris"
    assert first["model_version"] == "v1"


def test_mlserver_errors(mlserver: RunningServer) -> None:
    unknown = mlserver_support.post_infer(mlserver, mlserver_support.infer_body(), model="nope")
    assert (unknown.status_code, unknown.json()) == (404, {"error": "Model nope not found"})
    with client() as http:
        broken = http.post(
            f"{mlserver.url}/v2/models/iris/infer",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        metadata = http.get(f"{mlserver.url}/v2").json()
    assert broken.status_code == 422
    assert broken.json()["detail"][0]["type"] == "json_invalid"
    # MLServer's REST API has no binary tensor data extension; `extensions` lists none.
    assert metadata == {"name": "mlserver", "version": "1.7.1", "extensions": []}


def test_kserve_digest_of_binary_tensor_matches_hashlib(kserve_server: RunningServer) -> None:
    elements = [b"hello world", "h\u00e9llo \u2713".encode(), b"", b"\x00\x01 nul is fine"]
    answer = kserve_support.digest(kserve_server, elements)
    assert answer == [(hashlib.sha256(data).hexdigest(), len(data)) for data in elements]


def test_kserve_refuses_bytes_that_are_not_utf8(kserve_server: RunningServer) -> None:
    # KServe 0.21 decodes binary BYTES elements as UTF-8 before the model sees them.
    raw = kserve_support.bytes_tensor_raw([b"\xff\xfe\x80"])
    body, headers = kserve_support.binary_request([("data", "BYTES", [1], raw)])
    response = kserve_support.post_binary(kserve_server, "digest", body, headers)
    assert response.status_code == 500
    assert "using UTF-8" in response.json()["error"]


def test_kserve_sum(kserve_server: RunningServer) -> None:
    assert kserve_support.sum_fp32(kserve_server, [1, 2, 3, 4.5], shape=[2, 2]) == 10.5
    assert kserve_support.sum_fp32_binary(kserve_server, [1, 2, 3, 4.25]) == 10.25


def test_kserve_errors(kserve_server: RunningServer) -> None:
    unknown = kserve_support.post_infer(kserve_server, "nope", {"inputs": []})
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "Model with name nope does not exist."}
    with client() as http:
        broken = http.post(
            f"{kserve_server.url}/v2/models/sum/infer",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        metadata = http.get(f"{kserve_server.url}/v2").json()
    assert broken.status_code == 422
    assert broken.json()["detail"][0]["type"] == "json_invalid"
    wrong_type = kserve_support.post_infer(
        kserve_server,
        "sum",
        {"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [1]}]},
    )
    assert (wrong_type.status_code, wrong_type.json()) == (
        400,
        {"error": "sum takes FP32, not INT32"},
    )
    # KServe accepts the binary extension but does not list it.
    assert metadata == {
        "name": "kserve",
        "version": "0.21.0",
        "extensions": ["model_repository_extension"],
    }


def test_llama_chat_is_deterministic(llama_server: RunningServer) -> None:
    first = llamacpp_support.chat(llama_server)
    second = llamacpp_support.chat(llama_server)
    assert first
    assert first == second


def test_llama_embedding_has_a_vector(llama_embedding_server: RunningServer) -> None:
    rows = llamacpp_support.embedding(llama_embedding_server, "model dispatcher")
    assert rows
    assert all(len(row) == len(rows[0]) > 100 for row in rows)  # one vector per token here
    assert all(math.isfinite(value) for row in rows for value in row)
    assert llamacpp_support.embedding(llama_embedding_server, "model dispatcher") == rows


def test_llama_errors(llama_server: RunningServer) -> None:
    with client() as http:
        models = http.get(f"{llama_server.url}/v1/models").json()
        broken = http.post(
            f"{llama_server.url}/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
    assert [model["id"] for model in models["data"]] == [llamacpp_support.MODEL_ALIAS]
    assert broken.status_code >= 400
    # An unknown model name is not an error: the server answers with its default model.
    body = {**llamacpp_support.chat_body(max_tokens=4), "model": "nope"}
    assert llamacpp_support.post_json(llama_server, "/v1/chat/completions", body).status_code == 200
