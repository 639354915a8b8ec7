"""A real MLServer 1.7.1 (scikit-learn runtime) serving a tiny iris model over OIP v2 REST.

MLServer pins fastapi 0.115, so it runs from a venv of its own (locks/mlserver.txt). The model
is trained at test time, in that venv's python (the scikit-learn that will load it: a pickle
from another version may not load): LogisticRegression on the iris data that scikit-learn
ships, which needs no download and is deterministic (lbfgs, fixed data), so two calls with the
same rows answer the same (only the response `id` differs). It answers `predict` (INT64 class
per row) and, when asked, `predict_proba` (FP64 per class).

`settings.json` binds every port (HTTP, gRPC, metrics) to 127.0.0.1 with `parallel_workers: 0`
(one process, stopped by its process group) and `debug: false`: with MLServer's default debug
on, a 500 carries a Python traceback as text/plain, which is not what a deployment answers.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from devstack.processes import free_port
from tests.support.servers.running import HOST, RunningServer, clean_env, client, serving
from tests.support.servers.venvs import BuildError, Venv, ensure_venv

NAME = "mlserver"
MODEL_NAME = "iris"
MODEL_VERSION = "v1"
# Two iris flowers (setosa, virginica): the model answers [0, 2].
IRIS_ROWS: tuple[tuple[float, float, float, float], ...] = (
    (5.1, 3.5, 1.4, 0.2),
    (6.7, 3.0, 5.2, 2.3),
)
TRAIN_SCRIPT = """
import sys

import joblib
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

features, labels = load_iris(return_X_y=True)
model = LogisticRegression(max_iter=1000, random_state=0).fit(features, labels)
joblib.dump(model, sys.argv[1])
"""


def prepare() -> Venv:
    """The MLServer venv, built on first use (BuildError with pip's output if that fails)."""
    return ensure_venv(NAME)


def train_model(venv: Venv, target: Path) -> Path:
    """Train the iris model with the venv's scikit-learn and save it to `target` with joblib."""
    target.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [str(venv.python), "-c", TRAIN_SCRIPT, str(target)],
        capture_output=True,
        text=True,
        env=clean_env(venv, target.parent),
        check=False,
    )
    if result.returncode != 0 or not target.is_file():
        raise BuildError(f"training the iris model failed:\n{result.stdout}{result.stderr}")
    return target


def write_repository(venv: Venv, root: Path, *, debug: bool = False) -> dict[str, int]:
    """settings.json and `iris/` (model.joblib, model-settings.json) in `root`; the ports."""
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    settings = {"host": HOST, "parallel_workers": 0, "debug": debug, **ports}
    (root / "settings.json").write_text(json.dumps(settings, indent=2))
    model_dir = root / MODEL_NAME
    train_model(venv, model_dir / "model.joblib")
    model_settings = {
        "name": MODEL_NAME,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": MODEL_VERSION},
    }
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    return ports


@contextmanager
def running(venv: Venv, root: Path, *, debug: bool = False) -> Iterator[RunningServer]:
    """`mlserver start ROOT` with a clean environment, ready when the server and model are."""
    ports = write_repository(venv, root, debug=debug)
    with serving(
        "mlserver",
        [venv.script("mlserver"), "start", root],
        workdir=root,
        env=clean_env(venv, root),
        base_url=f"http://{HOST}:{ports['http_port']}",
        ready_paths=["/v2/health/ready", f"/v2/models/{MODEL_NAME}/ready"],
        model_name=MODEL_NAME,
        timeout=120.0,
    ) as server:
        yield server


# Direct calls: the ground truth the dispatcher's MLServer backend is compared against.


def infer_body(
    rows: Sequence[Sequence[float]] = IRIS_ROWS, outputs: Sequence[str] = ()
) -> dict[str, Any]:
    """An OIP v2 request for `rows` (FP32 [n, 4]); `outputs` names the tensors wanted."""
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": "input-0",
                "shape": [len(rows), len(rows[0]) if rows else 0],
                "datatype": "FP32",
                "data": [value for row in rows for value in row],
            }
        ]
    }
    if outputs:
        body["outputs"] = [{"name": name} for name in outputs]
    return body


def post_infer(
    server: RunningServer, body: dict[str, Any], model: str | None = None
) -> httpx.Response:
    """POST `body` to /v2/models/<model>/infer as it is; the raw response."""
    with client() as http:
        return http.post(f"{server.url}/v2/models/{model or server.model_name}/infer", json=body)


def infer(
    server: RunningServer,
    rows: Sequence[Sequence[float]] = IRIS_ROWS,
    outputs: Sequence[str] = (),
) -> dict[str, Any]:
    """The JSON answer for `rows`; AssertionError with the body if the status is not 200."""
    response = post_infer(server, infer_body(rows, outputs))
    assert response.status_code == 200, f"MLServer {response.status_code}: {response.text}"
    answer: dict[str, Any] = response.json()
    return answer


def without_id(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer less its per-request `id`: what two identical requests must agree on."""
    return {key: value for key, value in answer.items() if key != "id"}
