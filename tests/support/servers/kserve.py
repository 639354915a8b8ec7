"""A real KServe 0.21.0 model server (kserve_model.py: `digest` and `sum`) over OIP v2 REST.

KServe could install beside the project's pins, but it pulls grpcio, pandas and kubernetes into
the dispatcher's venv; a venv of its own (locks/kserve.txt) keeps the project's lock about the
project. The server is our own script (kserve_model.py), started with a clean environment; it
binds 127.0.0.1 on a free port, gRPC off.

Facts the helpers encode (KServe 0.21.0, checked against its source and by hand):
- The binary tensor data extension: the JSON header, then each input's raw bytes, with the
  header's length in `Inference-Header-Content-Length` and a content type that is not JSON
  (`application/octet-stream`): under `application/json` FastAPI parses the whole body as JSON
  and answers 422. A BYTES tensor's raw data is Triton's layout, a 4-byte little-endian length
  before each element; the input's `parameters.binary_data_size` is the raw length in bytes.
- KServe turns each binary BYTES element into a UTF-8 `str` before the model sees it, so only
  UTF-8 payloads get through; other bytes are a 500 whose message quotes the payload's bytes.
- `GET /v2` lists `extensions: ["model_repository_extension"]`, not binary_tensor_data.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from devstack.processes import free_port
from tests.support.servers.running import HOST, RunningServer, clean_env, client, serving
from tests.support.servers.venvs import Venv, ensure_venv

NAME = "kserve"
SCRIPT = Path(__file__).resolve().with_name("kserve_model.py")
MODELS = ("digest", "sum")
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"


def prepare() -> Venv:
    """The KServe venv, built on first use (BuildError with pip's output if that fails)."""
    return ensure_venv(NAME)


@contextmanager
def running(venv: Venv, root: Path) -> Iterator[RunningServer]:
    """kserve_model.py on a free port, ready when /v2/health/ready and each model answer 200."""
    http_port, grpc_port = free_port(), free_port()
    # -I (isolated): the script's folder, which holds this module (kserve.py), must not come
    # before the real kserve package on sys.path; nor may PYTHON* variables reach it.
    argv: list[str | Path] = [venv.python, "-I", SCRIPT]
    argv += ["--http_port", str(http_port), "--grpc_port", str(grpc_port)]
    with serving(
        "kserve",
        argv,
        workdir=root,
        env=clean_env(venv, root),
        base_url=f"http://{HOST}:{http_port}",
        ready_paths=["/v2/health/ready", *(f"/v2/models/{name}/ready" for name in MODELS)],
        model_name="digest",
        models=MODELS,
        timeout=90.0,
    ) as server:
        yield server


# Direct calls: the ground truth the dispatcher's KServe backend is compared against.


def bytes_tensor_raw(elements: Sequence[bytes]) -> bytes:
    """A BYTES tensor's raw data: each element after its 4-byte little-endian length."""
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def binary_request(
    inputs: Sequence[tuple[str, str, Sequence[int], bytes]],
    *,
    request_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a binary-extension request; `inputs`: (name, datatype, shape, raw)."""
    header: dict[str, Any] = {
        "inputs": [
            {
                "name": name,
                "datatype": datatype,
                "shape": list(shape),
                "parameters": {"binary_data_size": len(raw)},
            }
            for name, datatype, shape, raw in inputs
        ]
    }
    if request_id is not None:
        header["id"] = request_id
    encoded = json.dumps(header, separators=(",", ":")).encode()
    body = encoded + b"".join(raw for _, _, _, raw in inputs)
    return body, {HEADER_LENGTH: str(len(encoded)), "content-type": BINARY_CONTENT_TYPE}


def post_binary(
    server: RunningServer, model: str, body: bytes, headers: dict[str, str]
) -> httpx.Response:
    with client() as http:
        return http.post(f"{server.url}/v2/models/{model}/infer", content=body, headers=headers)


def post_infer(server: RunningServer, model: str, body: dict[str, Any]) -> httpx.Response:
    """POST a JSON OIP v2 request as it is; the raw response."""
    with client() as http:
        return http.post(f"{server.url}/v2/models/{model}/infer", json=body)


def _outputs(response: httpx.Response) -> dict[str, list[Any]]:
    assert response.status_code == 200, f"KServe {response.status_code}: {response.text}"
    answer: dict[str, Any] = response.json()
    return {output["name"]: output["data"] for output in answer["outputs"]}


def digest(server: RunningServer, elements: Sequence[bytes]) -> list[tuple[str, int]]:
    """(sha256 hex, length) per element, sent with the binary extension (UTF-8 bytes only)."""
    raw = bytes_tensor_raw(elements)
    body, headers = binary_request([("data", "BYTES", [len(elements)], raw)])
    outputs = _outputs(post_binary(server, "digest", body, headers))
    return list(zip(outputs["sha256"], outputs["length"], strict=True))


def sum_fp32(server: RunningServer, values: Sequence[float], shape: Sequence[int] = ()) -> float:
    """`sum` of FP32 `values` (shape: [len] unless given), sent as JSON."""
    body = {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": list(shape) or [len(values)],
                "data": list(values),
            }
        ]
    }
    total = _outputs(post_infer(server, "sum", body))["sum"][0]
    assert isinstance(total, float | int), f"sum answered {total!r}"
    return float(total)


def sum_fp32_binary(server: RunningServer, values: Sequence[float]) -> float:
    """`sum` of FP32 `values` sent with the binary extension (raw little-endian floats)."""
    raw = struct.pack(f"<{len(values)}f", *values)
    body, headers = binary_request([("x", "FP32", [len(values)], raw)])
    total = _outputs(post_binary(server, "sum", body, headers))["sum"][0]
    assert isinstance(total, float | int), f"sum answered {total!r}"
    return float(total)
