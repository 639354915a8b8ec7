"""Streamed OIP through the dispatcher against a real MLServer 1.7.1: `infer_stream` and
`generate_stream` over REST.

What MLServer 1.7.1 does (its source: mlserver/rest/app.py routes `/v2/models/{m}[/versions/
{v}]/infer_stream` and `.../generate_stream` both to `Endpoints.infer_stream`, which wraps
`DataPlane.infer_stream` in `_as_sse`; tried by hand too): a 200 `text/event-stream;
charset=utf-8`, chunked, one `data: {inference response}\\n\\n` event per response the model's
`MLModel.predict_stream` yields, one HTTP/1.1 chunk each, no `[DONE]`. The scikit-learn runtime
does not override `predict_stream`, whose default yields `predict`'s one response: a stream of
one. Each streamed response keeps MLServer's CloudEvents headers in `parameters.headers` ("TODO:
How should we send headers back?"), which the non-streamed `infer` sends as HTTP headers
instead (leaving `parameters: {}`). A model that raises mid-stream makes uvicorn drop the
connection without the last chunk (a body cut short); an unknown model is a bare 500 on
`infer_stream` (404 on `infer`).

So the tests: the session's `mlserver` (iris) streamed answers its one response, as MLServer's
own `infer_stream` does and as the non-streamed answer is but for `parameters`; `countdown`, a
tiny MLModel written here (COUNTDOWN_MODEL) and served by an MLServer of this module, yields N
responses D seconds apart, each stamped with the model's time: every one arrives as an `output`
event, in order, the first before the model produced its last, and `done` is the last response
(stream_oip.py: OIP does not say how responses add up); one that raises after K responses fails
the task `stream_broken` with the K responses kept and none of the model's exception text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devstack.processes import free_port
from tests.backends.stack import BackendStack, backend, backend_stack
from tests.support.servers import mlserver as mlserver_support
from tests.support.servers.running import HOST, RunningServer, clean_env, client, serving
from tests.support.sse_reader import Reading, read_events

pytestmark = pytest.mark.e2e

COUNTDOWN = "countdown"
STEPS, DELAY = 6, 0.25
SECRET = "countdown-secret-9b2e"  # the text of the model's exception
COUNTDOWN_MODEL = f'''
"""A streaming MLModel: `steps` [n, fail_at, delay_ms] -> n responses `delay_ms` apart."""

import asyncio
import time
from typing import AsyncIterator

from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput


class Countdown(MLModel):
    async def load(self) -> bool:
        return True

    def response(self, i: int, n: int) -> InferenceResponse:
        outputs = [
            ResponseOutput(name="step", datatype="INT64", shape=[1], data=[i]),
            ResponseOutput(name="of", datatype="INT64", shape=[1], data=[n]),
            ResponseOutput(name="t", datatype="FP64", shape=[1], data=[time.time()]),
        ]
        return InferenceResponse(model_name=self.name, outputs=outputs)

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        n = int(payload.inputs[0].data[0])
        return self.response(n - 1, n)

    async def predict_stream(
        self, payloads: AsyncIterator[InferenceRequest]
    ) -> AsyncIterator[InferenceResponse]:
        payload = await payloads.__anext__()
        n, fail_at, delay_ms = (int(value) for value in payload.inputs[0].data)
        for i in range(n):
            if i == fail_at:
                raise RuntimeError("{SECRET}")
            if i:
                await asyncio.sleep(delay_ms / 1000)
            yield self.response(i, n)
'''


@pytest.fixture(scope="module")
def countdown_server(
    mlserver: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """An MLServer 1.7.1 serving only `countdown` (it asks for `mlserver` so that the session
    hook builds the venv first; the iris tests use that one)."""
    venv = mlserver_support.prepare()
    root = tmp_path_factory.mktemp("mlserver-countdown")
    # As mlserver_support.write_repository's (no debug tracebacks, one process), no iris.
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    settings = {"host": HOST, "parallel_workers": 0, "debug": False, **ports}
    (root / "settings.json").write_text(json.dumps(settings))
    model = root / COUNTDOWN
    model.mkdir()
    (model / "countdown.py").write_text(COUNTDOWN_MODEL)
    model_settings = {"name": COUNTDOWN, "implementation": "countdown.Countdown"}
    (model / "model-settings.json").write_text(json.dumps(model_settings))
    with serving(
        "mlserver-countdown",
        [venv.script("mlserver"), "start", root],
        workdir=root,
        env=clean_env(venv, root),
        base_url=f"http://{HOST}:{ports['http_port']}",
        ready_paths=["/v2/health/ready", f"/v2/models/{COUNTDOWN}/ready"],
        model_name=COUNTDOWN,
        timeout=120.0,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def dispatcher(
    mlserver: RunningServer,
    countdown_server: RunningServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BackendStack]:
    backends = {"mls": backend(mlserver, "oip"), "cd": backend(countdown_server, "oip")}
    root = tmp_path_factory.mktemp("stream-mlserver")
    with backend_stack(root, backends, default="mls") as stack:
        yield stack


def countdown_body(n: int, fail_at: int = -1, delay: float = DELAY) -> dict[str, Any]:
    data = [n, fail_at, int(delay * 1000)]
    return {"id": "cd-1", "inputs": [{"name": "steps", "datatype": "INT64", "shape": [3],
                                      "data": data}]}  # fmt: skip


def direct_stream(server: RunningServer, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """MLServer's own streamed answer to `body`: the JSON of each `data:` event, in order."""
    with client(timeout=60.0) as http:
        response = http.post(f"{server.url}{path}", json=body)
    assert response.status_code == 200, f"{response.status_code}: {response.text}"
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers
    events = [part for part in response.text.split("\n\n") if part.strip()]
    assert all(event.startswith("data: ") for event in events), response.text
    return [json.loads(event.removeprefix("data: ")) for event in events]


def read_raw(url: str, body: dict[str, Any], into: bytearray) -> None:
    """POST `body` to `url` and read the raw body into `into` (what came before an error)."""
    with client() as http, http.stream("POST", url, json=body) as response:
        assert response.status_code == 200, response.status_code
        for piece in response.iter_raw():
            into += piece


def streamed(
    dispatcher: BackendStack, request: dict[str, Any]
) -> tuple[str, Reading, dict[str, Any]]:
    """Submit `request` with `stream: true` (202), read its stream: task id, events, view."""
    accepted = dispatcher.dispatch({**request, "stream": True}, wait=0)
    assert accepted.status_code == 202, accepted.text
    task_id = accepted.json()["task_id"]
    reading = read_events(dispatcher.http, accepted.json()["stream_url"])
    assert reading.status == 200, reading
    return task_id, reading, dispatcher.task(task_id)


def untimed(response: dict[str, Any]) -> dict[str, Any]:
    """A countdown response less its `t` output (the model's clock, per run)."""
    return {**response, "outputs": [o for o in response["outputs"] if o["name"] != "t"]}


def test_iris_streams_its_one_response(dispatcher: BackendStack, mlserver: RunningServer) -> None:
    request = mlserver_support.infer_body(outputs=("predict", "predict_proba"))
    request["id"] = "stream-iris"
    [expected] = direct_stream(mlserver, "/v2/models/iris/infer_stream", request)
    task_id, reading, view = streamed(dispatcher, {"model_name": "iris", "input": request})
    assert [event.kind for event in reading.events] == ["output", "done"]
    assert reading.outputs[0].json() == expected  # MLServer's response, as it sent it
    assert view["status"] == "succeeded", view
    assert view["prediction_value"] == expected
    done = reading.events[-1].json()
    assert (done["task_id"], done["prediction_value"]) == (task_id, expected)
    # The non-streamed answer is the same response; only MLServer's CloudEvents headers differ,
    # sent in the body's `parameters` when streamed and as HTTP headers otherwise.
    plain = dispatcher.succeeded(dispatcher.dispatch({"model_name": "iris", "input": request}))
    unstreamed = plain["prediction_value"]
    assert unstreamed["parameters"] == {}, unstreamed
    assert {**expected, "parameters": {}} == unstreamed
    assert expected["parameters"]["headers"]["Ce-Modelid"] == "iris"
    assert unstreamed["outputs"][0]["data"] == [0, 2]


@pytest.mark.parametrize("operation", ["infer", "generate"])
def test_countdown_responses_arrive_in_order_as_produced(
    dispatcher: BackendStack, countdown_server: RunningServer, operation: str
) -> None:
    body = countdown_body(STEPS)
    expected = direct_stream(countdown_server, f"/v2/models/{COUNTDOWN}/{operation}_stream", body)
    assert len(expected) == STEPS
    request = {"model_name": COUNTDOWN, "backend": "cd", "operation": operation, "input": body}
    _, reading, view = streamed(dispatcher, request)
    assert [event.kind for event in reading.events] == ["output"] * STEPS + ["done"]
    outputs = [event.json() for event in reading.outputs]
    assert [untimed(o) for o in outputs] == [untimed(e) for e in expected]
    assert [o["outputs"][0]["data"] for o in outputs] == [[i] for i in range(STEPS)]
    # done: the last response (OIP says nothing of joining them), as the view says.
    assert view["status"] == "succeeded", view
    assert view["prediction_value"] == outputs[-1]
    assert reading.events[-1].json()["prediction_value"] == outputs[-1]
    # Streamed, not buffered: the first response reached us before the model made its last.
    made = [o["outputs"][2]["data"][0] for o in outputs]
    arrived = [event.arrived for event in reading.outputs]
    assert arrived[0] < made[-1], (arrived, made)
    assert all(a >= m for a, m in zip(arrived, made, strict=True)), (arrived, made)


def test_a_model_that_raises_mid_stream_is_stream_broken(
    dispatcher: BackendStack, countdown_server: RunningServer
) -> None:
    body = countdown_body(5, fail_at=2, delay=0.05)
    # MLServer itself: two events, then the chunked body is cut.
    got = bytearray()
    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
        read_raw(f"{countdown_server.url}/v2/models/{COUNTDOWN}/infer_stream", body, got)
    assert got.count(b"data: ") == 2, got
    request = {"model_name": COUNTDOWN, "backend": "cd", "input": body}
    _, reading, view = streamed(dispatcher, request)
    assert [event.kind for event in reading.events] == ["output", "output", "error"]
    assert [e.json()["outputs"][0]["data"] for e in reading.outputs] == [[0], [1]]
    assert view["status"] == "failed", view
    error = reading.events[-1].json()
    assert error == view["error"]
    assert (error["status"], error["code"]) == (502, "stream_broken"), error
    assert error["msg"].startswith("backend 'cd' (oip) at http://127.0.0.1:"), error
    assert "closed the connection in the middle of a streamed answer" in error["msg"]
    assert SECRET not in error["msg"]
    assert SECRET in countdown_server.log_tail(200)  # MLServer logged it; we did not pass it on


def test_an_unknown_model_streamed_is_a_502(
    dispatcher: BackendStack, mlserver: RunningServer
) -> None:
    request = mlserver_support.infer_body()
    with client() as http:
        direct = http.post(f"{mlserver.url}/v2/models/nope/infer_stream", json=request)
    # MLServer's streamed route answers a bare 500 where `infer` says 404.
    assert (direct.status_code, direct.text) == (500, "Internal Server Error")
    accepted = dispatcher.dispatch({"model_name": "nope", "input": request, "stream": True}, wait=0)
    assert accepted.status_code == 202, accepted.text
    reading = read_events(dispatcher.http, accepted.json()["stream_url"])
    assert [event.kind for event in reading.events] == ["error"]
    error = reading.events[0].json()
    assert (error["status"], error["code"]) == (502, "backend_error"), error
    assert "failed (500)" in error["msg"], error
