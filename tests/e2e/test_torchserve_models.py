"""Model archives and TorchServe as the local stack runs them: the demo and test models answer
the documented ways, token auth, and registering models on a TorchServe started without any."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import httpx
import pytest

from devstack import PAYLOAD_MODULE, TorchServe, archive_demo_models, archive_model
from tests.support.faults import running
from tests.support.paths import SUPPORT

# --- model archives ----------------------------------------------------------------------------


def test_archive_model_names_the_file_and_the_model(tmp_path: Path) -> None:
    models = SUPPORT / "models"
    mar = archive_model(
        "versioned", models / "versioned_v2.py", tmp_path, "2.0", [PAYLOAD_MODULE],
        mar_name="versioned_v2",
    )  # fmt: skip
    assert mar == tmp_path / "versioned_v2.mar"
    with zipfile.ZipFile(mar) as archive:
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        assert {"versioned_v2.py", "payload.py"} <= set(archive.namelist())
    assert manifest["model"]["modelName"] == "versioned"
    assert manifest["model"]["modelVersion"] == "2.0"
    assert [path.name for path in tmp_path.iterdir()] == ["versioned_v2.mar"]  # no scratch left


def test_archive_demo_models(tmp_path: Path) -> None:
    assert archive_demo_models(tmp_path) == [
        "echo.mar",
        "linear.mar",
        "image_info.mar",
        "grayscale.mar",
    ]


def test_archive_model_reports_archiver_errors(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="torch-model-archiver failed"):
        archive_model("broken", tmp_path / "missing.py", tmp_path)


# --- TorchServe (the session instance of conftest) ---------------------------------------------


def _predict(server: TorchServe, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{server.inference_url}/predictions/{path}", json=body, timeout=30)


def test_torchserve_has_every_model_ready(torchserve: TorchServe) -> None:
    for model in ("echo", "linear", "failing", "rejecting", "counting", "versioned"):
        assert torchserve.ready(model), model
    slow = torchserve.describe("slow")
    assert [worker["status"] for worker in slow[0]["workers"]] == ["READY", "READY"]
    assert sorted(d["modelVersion"] for d in torchserve.describe("versioned")) == ["1.0", "2.0"]
    print(f"TorchServe with 7 models was ready after {torchserve.start_seconds:.1f} s")


def test_echo_returns_the_body(torchserve: TorchServe) -> None:
    body = {"hello": "world", "n": [1, 2.5, None], "nested": {"ok": True}}
    response = _predict(torchserve, "echo", body)
    assert response.status_code == 200
    assert response.json() == body
    text = httpx.post(f"{torchserve.inference_url}/predictions/echo", content=b"not json")
    assert text.text == "not json"


# nn.Linear(3, 2) initialised after torch.manual_seed(0), computed once with torch 2.13 (this
# process does not import torch: without numpy installed its import warns, and warnings fail).
LINEAR_EXPECTED = [
    [-0.8218859434127808, 0.0526045560836792],
    [-0.5587476491928101, 0.757554292678833],
]


def test_linear_is_deterministic(torchserve: TorchServe) -> None:
    first = _predict(torchserve, "linear", {"inputs": [[1, 2, 3], [0, -1, 0.5]]})
    second = _predict(torchserve, "linear", {"inputs": [[1, 2, 3], [0, -1, 0.5]]})
    assert first.status_code == 200
    outputs = first.json()["outputs"]
    assert first.json() == second.json()
    assert [len(row) for row in outputs] == [2, 2]
    for row, expected in zip(outputs, LINEAR_EXPECTED, strict=True):
        assert row == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"x": [[1, 2, 3]]}, "missing 'inputs'"),
        ({"inputs": [[1, 2]]}, "wrong shape"),
        ({"inputs": []}, "wrong shape"),
        ({"inputs": [[1, 2, "3"]]}, "wrong shape"),
        ([1, 2, 3], "missing 'inputs'"),
    ],
)
def test_linear_rejects_bad_input_with_422(
    torchserve: TorchServe, body: object, message: str
) -> None:
    response = _predict(torchserve, "linear", body)
    assert response.status_code == 422
    assert message in response.json()["message"]


def test_versions_answer_differently(torchserve: TorchServe) -> None:
    assert _predict(torchserve, "versioned/1.0", {"a": 1}).json() == {
        "version": "1.0",
        "echo": {"a": 1},
    }
    assert _predict(torchserve, "versioned/2.0", {"a": 1}).json()["version"] == "2.0"
    # The first version registered stays the default.
    assert _predict(torchserve, "versioned", {}).json()["version"] == "1.0"


def test_test_models_fail_the_documented_ways(torchserve: TorchServe) -> None:
    failing = _predict(torchserve, "failing", {})
    assert (failing.status_code, failing.json()["message"]) == (503, "Prediction failed")
    rejecting = _predict(torchserve, "rejecting", {"x": -1})
    assert rejecting.status_code == 422
    assert rejecting.json()["message"] == "input rejected: field 'x' must be positive"
    slow = _predict(torchserve, "slow", {"sleep": 0.2})
    assert slow.json() == {"slept": 0.2, "echo": {"sleep": 0.2}}


def test_counting_model_logs_each_request(torchserve: TorchServe, counting_log: Path) -> None:
    before = len(counting_log.read_text().splitlines()) if counting_log.exists() else 0
    response = _predict(torchserve, "counting", {"marker": "test-counting"})
    assert response.json() == {"count": before + 1}
    assert json.loads(counting_log.read_text().splitlines()[-1]) == {"marker": "test-counting"}


# --- TorchServe with token auth, on its own -----------------------------------------------------


def test_torchserve_token_auth_and_stop(tmp_path: Path) -> None:
    store = tmp_path / "store"
    archive_demo_models(store)
    server = TorchServe(tmp_path / "ts", store, ["echo.mar"], token_auth=True)
    with server:
        token = server.inference_token
        assert token
        anonymous = _predict(server, "echo", {"a": 1})
        assert anonymous.status_code == 400
        assert anonymous.json()["type"] == "InvalidKeyException"
        authorized = httpx.post(
            f"{server.inference_url}/predictions/echo",
            json={"a": 1},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert authorized.json() == {"a": 1}
        workers = [w["pid"] for w in server.describe("echo")[0]["workers"]]
        print(f"TorchServe with echo only was ready after {server.start_seconds:.1f} s")
    assert not server.alive
    assert not any(running(pid) for pid in workers)  # model workers went with the frontend
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.inference_url}/ping")


def test_torchserve_without_models_starts_and_registers(tmp_path: Path) -> None:
    store = tmp_path / "store"
    archive_demo_models(store)
    with TorchServe(tmp_path / "ts", store, []) as server:
        assert httpx.get(f"{server.management_url}/models").json() == {"models": []}
        server.register("echo.mar")
        assert server.ready("echo")
        assert _predict(server, "echo", [1, 2]).json() == [1, 2]
