"""The dispatcher in front of a real MLServer 1.7.1 (scikit-learn iris), against direct calls.

Every answer is compared with the same inference request sent to MLServer directly: OIP says
`prediction_value` is the server's answer as it sent it, so the two must be equal as JSON, key
for key. MLServer echoes a request's `id` and makes one up for a request without; requests here
carry a fixed `id`, so the whole answer is compared (one test sends none and compares all but
`id`, as test_servers_direct.py does). Covered: sync (200), async (202, then a long-poll of
GET /tasks/{id}), a batch whose items name their backends, `model_version`, and MLServer's
errors as the contract maps them (404 -> 404 model_not_found; 400 and its own 422 -> 422
model_rejected_input carrying MLServer's message; a 500 -> 502 without its text), each naming
the backend. Also /backends and /ready on the real server, and bytes refused up front (MLServer
lists no binary tensor extension).

One stack for the module: backends `mls` (the default) and `mls-alt`, both this MLServer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.backends.stack import BackendStack, backend, backend_stack
from tests.support.servers import mlserver as mlserver_support
from tests.support.servers.running import RunningServer, client

pytestmark = pytest.mark.e2e

ROWS = mlserver_support.IRIS_ROWS
OUTPUTS = ("predict", "predict_proba")
# Three flowers, one per class, for the batch and the async test.
OTHER_ROWS = ((5.0, 3.4, 1.5, 0.2), (5.9, 2.8, 4.4, 1.4), (7.2, 3.2, 6.0, 1.8))


@pytest.fixture(scope="module")
def dispatcher(
    mlserver: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackendStack]:
    backends = {"mls": backend(mlserver, "oip"), "mls-alt": backend(mlserver, "oip")}
    root = tmp_path_factory.mktemp("dispatch-mlserver")
    with backend_stack(root, backends, default="mls") as stack:
        yield stack


def body(
    rows: tuple[tuple[float, ...], ...] = ROWS, request_id: str | None = "req-1"
) -> dict[str, Any]:
    """An iris inference request asking for both outputs, with a fixed `id` unless None."""
    request = mlserver_support.infer_body(rows, OUTPUTS)
    if request_id is not None:
        request["id"] = request_id
    return request


def direct(
    server: RunningServer, request: dict[str, Any], path: str = "/v2/models/iris/infer"
) -> tuple[int, Any]:
    """MLServer's own status and JSON answer to `request` at `path`."""
    with client() as http:
        response = http.post(f"{server.url}{path}", json=request)
    return response.status_code, response.json()


def test_sync_answer_is_mlservers_answer(dispatcher: BackendStack, mlserver: RunningServer) -> None:
    request = body()
    status, expected = direct(mlserver, request)
    assert status == 200, expected
    done = dispatcher.succeeded(
        dispatcher.dispatch({"model_name": "iris", "backend": "mls", "input": request})
    )
    assert done["prediction_value"] == expected
    assert (done["backend"], done["model_name"], done["model_version"]) == ("mls", "iris", None)
    # The default backend (no `backend` field) is the same server, the same answer.
    default = dispatcher.succeeded(dispatcher.dispatch({"model_name": "iris", "input": request}))
    assert default["prediction_value"] == expected
    assert default["backend"] == "mls"


def test_an_answer_without_a_request_id_differs_only_in_its_id(
    dispatcher: BackendStack, mlserver: RunningServer
) -> None:
    request = body(request_id=None)
    _, expected = direct(mlserver, request)
    done = dispatcher.succeeded(dispatcher.dispatch({"model_name": "iris", "input": request}))
    answer = done["prediction_value"]
    assert mlserver_support.without_id(answer) == mlserver_support.without_id(expected)
    assert answer["id"] != expected["id"]  # each made up by MLServer


def test_model_version_reaches_the_versioned_route(
    dispatcher: BackendStack, mlserver: RunningServer
) -> None:
    request = body(request_id="versioned")
    status, expected = direct(mlserver, request, "/v2/models/iris/versions/v1/infer")
    assert status == 200, expected
    dispatched = {"model_name": "iris", "model_version": "v1", "input": request}
    done = dispatcher.succeeded(dispatcher.dispatch(dispatched))
    assert done["prediction_value"] == expected
    assert done["model_version"] == "v1"
    status, missing = direct(mlserver, request, "/v2/models/iris/versions/v9/infer")
    assert (status, missing) == (404, {"error": "Model iris with version v9 not found"})
    unknown = dispatcher.dispatch({**dispatched, "model_version": "v9"})
    assert unknown.status_code == 404, unknown.text
    error = unknown.json()
    assert error["code"] == "model_not_found"
    assert "backend 'mls' (oip)" in error["msg"]
    assert missing["error"] in error["msg"]


def test_async_then_long_poll(dispatcher: BackendStack, mlserver: RunningServer) -> None:
    request = body(OTHER_ROWS, request_id="async-1")
    _, expected = direct(mlserver, request)
    accepted = dispatcher.dispatch(
        {"model_name": "iris", "backend": "mls-alt", "input": request}, wait=0
    )
    assert accepted.status_code == 202, accepted.text
    task_id = accepted.json()["task_id"]
    assert accepted.headers["location"] == f"/tasks/{task_id}"
    view = dispatcher.task(task_id)
    assert view["status"] == "succeeded", view
    assert view["prediction_value"] == expected
    assert view["backend"] == "mls-alt"
    assert view["prediction_value"]["outputs"][0]["data"] == [0, 1, 2]  # one of each class


def test_a_batch_answers_each_item_as_mlserver_does(
    dispatcher: BackendStack, mlserver: RunningServer
) -> None:
    rows = [(row,) for row in (*ROWS, *OTHER_ROWS)]
    requests = [body(flowers, request_id=f"item-{i}") for i, flowers in enumerate(rows)]
    expected = [direct(mlserver, request)[1] for request in requests]
    names = ["mls", None, "mls-alt", "mls", "mls-alt"]  # None: the default backend
    items = [
        {"custom_id": f"c{i}", "model_name": "iris", "input": request}
        | ({} if name is None else {"backend": name})
        for i, (request, name) in enumerate(zip(requests, names, strict=True))
    ]
    results = dispatcher.batch(items)
    assert [r["custom_id"] for r in results] == [f"c{i}" for i in range(len(items))]
    assert [r["status"] for r in results] == ["succeeded"] * len(items), results
    assert [r["prediction_value"] for r in results] == expected
    backends = [dispatcher.task(r["task_id"])["backend"] for r in results]
    assert backends == [name or "mls" for name in names]


def test_unknown_model_is_404_model_not_found(
    dispatcher: BackendStack, mlserver: RunningServer
) -> None:
    status, expected = direct(mlserver, body(), "/v2/models/nope/infer")
    assert (status, expected) == (404, {"error": "Model nope not found"})
    response = dispatcher.dispatch({"model_name": "nope", "input": body()})
    assert response.status_code == 404, response.text
    error = response.json()
    assert (error["status"], error["code"]) == (404, "model_not_found")
    assert error["msg"].startswith("backend 'mls' (oip) at http://127.0.0.1:")
    assert "Model nope not found" in error["msg"]
    assert dispatcher.task(error["task_id"])["error"]["code"] == "model_not_found"


def _rejected(dispatcher: BackendStack, request: dict[str, Any]) -> dict[str, Any]:
    response = dispatcher.dispatch({"model_name": "iris", "backend": "mls-alt", "input": request})
    assert response.status_code == 422, response.text
    error: dict[str, Any] = response.json()
    assert (error["status"], error["code"]) == (422, "model_rejected_input")
    assert error["msg"].startswith("backend 'mls-alt' (oip) at http://127.0.0.1:")
    return error


def test_a_body_mlserver_rejects_is_422_with_its_message(
    dispatcher: BackendStack, mlserver: RunningServer
) -> None:
    # Valid OIP (the API lets it through), but the sklearn runtime has no such output: 400.
    unknown_output = body()
    unknown_output["outputs"] = [{"name": "nope"}]
    status, expected = direct(mlserver, unknown_output)
    assert status == 400, expected
    error = _rejected(dispatcher, unknown_output)
    assert f"rejected the input (400): {expected['error']}" in error["msg"]
    # MLServer's own request model refuses a non-string content type: FastAPI's 422.
    bad_parameter = body()
    bad_parameter["parameters"] = {"content_type": 7}
    status, refused = direct(mlserver, bad_parameter)
    assert status == 422, refused
    error = _rejected(dispatcher, bad_parameter)
    assert "rejected the input (422)" in error["msg"]
    assert refused["detail"][0]["msg"] in error["msg"]
    assert "content_type" in error["msg"]


def test_a_server_error_is_502_without_its_text(
    dispatcher: BackendStack, mlserver: RunningServer
) -> None:
    # Eight values do not fill a [2, 5] tensor: numpy raises inside MLServer, a bare 500.
    broken = body()
    broken["inputs"][0]["shape"] = [2, 5]
    with client() as http:
        direct_status = http.post(f"{mlserver.url}/v2/models/iris/infer", json=broken).status_code
    assert direct_status == 500
    response = dispatcher.dispatch({"model_name": "iris", "input": broken})
    assert response.status_code == 502, response.text
    error = response.json()
    assert error["code"] == "backend_error"
    assert error["msg"].startswith("backend 'mls' (oip) at http://127.0.0.1:")
    assert "failed (500)" in error["msg"]
    assert "5.1" not in error["msg"]  # nothing of the input


def test_backends_and_ready_report_mlserver(dispatcher: BackendStack) -> None:
    listed = dispatcher.backend_list()
    for name in ("mls", "mls-alt"):
        info = listed[name]
        assert (info["protocol"], info["health"], info["models"]) == ("oip", "ok", ["iris"])
        assert info["takes_bytes"] is False  # GET /v2 lists no binary_tensor_data
        assert info["operations"] == ["infer", "generate"]
    assert (listed["mls"]["default"], listed["mls"]["gates_readiness"]) == (True, True)
    assert (listed["mls-alt"]["default"], listed["mls-alt"]["gates_readiness"]) == (False, False)
    ready = dispatcher.http.get("/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["mls"] == "ok"


def test_bytes_to_mlserver_are_refused_before_queueing(dispatcher: BackendStack) -> None:
    response = dispatcher.http.post(
        "/dispatch_model",
        params={"model_name": "iris", "backend": "mls"},
        content=b"\x00\x01 raw bytes",
        headers={"content-type": "application/octet-stream"},
    )
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["code"] == "unsupported_operation"
    assert "'mls'" in error["msg"]
    assert "task_id" not in error or error["task_id"] is None
