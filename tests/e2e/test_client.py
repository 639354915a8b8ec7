"""dispatcher_client against the real stack: redis-server, Celery workers, TorchServe, the API.

A small proxy in front of the API injects 503s, to show that the client's retries (one
Idempotency-Key per call) make exactly one model call even when the first answer was lost after
the task had run.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import dispatcher_client as dc
import httpx
import pytest
from dispatcher_client import AsyncDispatcher, Binary, Dispatcher
from PIL import Image

from devstack import Stack
from tests.support.client_proxy import InjectingProxy
from tests.support.paths import REPO as REPO_ROOT
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

ROOT = REPO_ROOT
PICTURE = ROOT / "models" / "example.png"


@pytest.fixture
def client(stack: Stack) -> Iterator[Dispatcher]:
    with Dispatcher(stack.api_url) as http:
        yield http


def model_calls(log: Path, marker: str) -> int:
    """Requests the `counting` model received that carried `marker`."""
    if not log.exists():
        return 0
    lines = log.read_text(encoding="utf-8").splitlines()
    return sum(1 for line in lines if json.loads(line).get("marker") == marker)


# --- sync ----------------------------------------------------------------------------------------


def test_predict_returns_the_prediction(client: Dispatcher) -> None:
    value = client.predict("linear", {"inputs": [[1, 2, 3]]})
    assert len(value["outputs"][0]) == 2
    assert client.predict("linear", {"inputs": [[1, 2, 3]]}) == value  # fixed-seed weights
    assert client.predict("echo", {"hello": "world"}, version=None) == {"hello": "world"}


def test_submit_then_result_status_and_cancel(client: Dispatcher) -> None:
    task = client.submit("slow", {"sleep": 0.5})
    assert task.status().status in ("queued", "running")
    assert task.result(timeout=20) == {"slept": 0.5, "echo": {"sleep": 0.5}}
    info = task.status()
    assert info.done
    assert info.finished_at is not None
    with pytest.raises(dc.Conflict) as raised:
        task.cancel()  # finished: 409 task_finished
    assert raised.value.code == "task_finished"


def test_a_wait_that_runs_out_leaves_a_task_to_reattach_to(client: Dispatcher) -> None:
    with pytest.raises(dc.WaitTimeout) as raised:
        client.predict("slow", {"sleep": 1.5}, wait=0.3)
    assert raised.value.task_id
    assert client.task(raised.value.task_id).result(timeout=20)["slept"] == 1.5


class Recording(httpx.HTTPTransport):
    """The real network, remembering each exchange as (method, path, query, status)."""

    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[tuple[str, str, str, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        query = request.url.query.decode()
        self.exchanges.append((request.method, request.url.path, query, response.status_code))
        return response


def test_a_wait_the_server_cuts_short_reattaches_without_resubmitting(
    stack_factory: StackFactory, counting_log: Path
) -> None:
    # The server caps every wait at 0.5 s: the dispatch answers 202, then the client long-polls.
    wait_env = {"DISPATCH_DEFAULT_WAIT": "0.5", "DISPATCH_MAX_WAIT": "0.5"}
    stack = stack_factory.start(workers=1, env=wait_env)
    marker = str(uuid.uuid4())
    transport = Recording()
    with Dispatcher(stack.api_url, transport=transport) as client:
        value = client.predict("counting", {"marker": marker, "sleep": 2})
    assert isinstance(value["count"], int)
    assert model_calls(counting_log, marker) == 1
    posts = [x for x in transport.exchanges if x[0] == "POST"]
    polls = [x for x in transport.exchanges if x[0] == "GET"]
    assert [status for *_, status in posts] == [202]
    assert len(polls) >= 2  # each poll held at most 0.5 s by the server
    assert all(path.startswith("/tasks/") and "wait=" in query for _, path, query, _ in polls)
    assert polls[-1][3] == 200


def example(page: str, heading: str) -> str:
    """The first Python block under `heading` in `page` (a path from the repository's root)."""
    section = (ROOT / page).read_text(encoding="utf-8").split(heading + "\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_runs(
    stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code = example("README.md", "## Python client")
    # The client's page shows the same example, so running one runs both.
    assert example("docs/client.md", "## Example") == code
    monkeypatch.chdir(ROOT)  # the example reads models/example.png
    program = compile(code.replace("http://127.0.0.1:8000", stack.api_url), "README.md", "exec")
    exec(program, {})  # noqa: S102  (the README's own code, run as a reader would)
    linear, echo, item, *events = capsys.readouterr().out.splitlines()
    assert linear.startswith("{'outputs': [[")
    assert echo.startswith("{'n': 1} image/png ")
    assert item == "a succeeded 1"
    assert events == ["output {'n': 2}", "done succeeded"]  # echo answers in one chunk


# --- bytes in and out ----------------------------------------------------------------------------


def test_bytes_in_and_a_picture_out(client: Dispatcher) -> None:
    picture = PICTURE.read_bytes()
    gray = client.predict("grayscale", data=picture, content_type="image/png")
    assert isinstance(gray, Binary)
    assert gray.content_type == "image/png"
    with Image.open(io.BytesIO(gray)) as image:
        assert image.mode == "L"
        with Image.open(PICTURE) as original:
            assert image.size == original.size


@pytest.mark.parametrize("content_type", ["application/octet-stream", "application/json"])
def test_bytes_come_back_byte_for_byte(client: Dispatcher, content_type: str) -> None:
    payload = os.urandom(50_000) if content_type != "application/json" else b'{"raw": [1, 2]}'
    back = client.predict("mirror", data=payload, content_type=content_type)
    if content_type == "application/json":
        assert back == {"raw": [1, 2]}  # a JSON answer is parsed, not bytes
    else:
        assert isinstance(back, Binary)
        assert bytes(back) == payload


def test_raw_bytes_reach_the_model_unchanged(client: Dispatcher) -> None:
    payload = os.urandom(100_000)
    parts = client.predict("digest", data=payload, content_type="application/octet-stream")
    assert parts["body"]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert parts["body"]["content_type"] == "application/octet-stream"


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "payload", "cls", "code"),
    [
        ("no_such_model", {}, dc.ModelNotFound, "model_not_found"),
        ("rejecting", {}, dc.ModelRejectedInput, "model_rejected_input"),
        ("failing", {}, dc.ModelFailed, "torchserve_error"),
        ("bad/name", {}, dc.InvalidRequest, "invalid_request"),
    ],
)
def test_errors_are_typed(
    client: Dispatcher, model: str, payload: object, cls: type[dc.DispatcherError], code: str
) -> None:
    with pytest.raises(cls) as raised:
        client.predict(model, payload)
    assert raised.value.code == code
    assert raised.value.message
    if code != "invalid_request":  # refused before a task existed: no task id
        assert raised.value.task_id


def test_unknown_task_is_task_not_found(client: Dispatcher) -> None:
    with pytest.raises(dc.TaskNotFound):
        client.task(str(uuid.uuid4())).status()


def test_backend_and_operation_and_the_backends_listed(client: Dispatcher) -> None:
    assert client.predict("echo", {"b": 1}, backend="torchserve") == {"b": 1}
    task = client.submit("echo", {"b": 2}, backend="torchserve", operation="predictions")
    assert task.result(timeout=30) == {"b": 2}
    assert task.status().backend == "torchserve"
    with pytest.raises(dc.InvalidRequest) as raised:
        client.predict("echo", 1, backend="nope")
    assert raised.value.code == "unknown_backend"
    with pytest.raises(dc.InvalidRequest) as raised:
        client.predict("echo", 1, operation="infer")
    assert raised.value.code == "unsupported_operation"
    [torchserve] = client.backends()
    assert (torchserve.name, torchserve.default, torchserve.healthy) == ("torchserve", True, True)


# --- async ---------------------------------------------------------------------------------------


def test_async_client(stack: Stack) -> None:
    picture = PICTURE.read_bytes()

    async def main() -> None:
        async with AsyncDispatcher(stack.api_url) as client:
            values = await asyncio.gather(*(client.predict("echo", {"n": n}) for n in range(8)))
            assert values == [{"n": n} for n in range(8)]
            task = await client.submit("slow", {"sleep": 0.3})
            assert (await task.result(timeout=20))["slept"] == 0.3
            gray = await client.predict("grayscale", data=picture, content_type="image/png")
            assert isinstance(gray, Binary)
            assert gray[:8] == b"\x89PNG\r\n\x1a\n"
            with pytest.raises(dc.ModelNotFound):
                await client.predict("no_such_model", {})

    asyncio.run(main())


# --- retries: a proxy that injects 503s ----------------------------------------------------------


@pytest.fixture
def proxy_factory(stack: Stack) -> Iterator[Callable[[bool], InjectingProxy]]:
    proxies: list[InjectingProxy] = []

    def start(forward_first: bool) -> InjectingProxy:
        proxy = InjectingProxy(stack.api_url, forward_first).__enter__()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.__exit__()


@pytest.mark.parametrize("forward_first", [False, True], ids=["refused", "answer-lost"])
def test_a_503_is_retried_and_the_model_runs_once(
    proxy_factory: Callable[[bool], InjectingProxy], counting_log: Path, forward_first: bool
) -> None:
    proxy = proxy_factory(forward_first)
    marker = str(uuid.uuid4())
    with Dispatcher(proxy.url) as client:
        value = client.predict("counting", {"marker": marker})
    assert isinstance(value["count"], int)
    assert model_calls(counting_log, marker) == 1
    (first_key, first, _), (second_key, second, replayed) = proxy.posts
    assert first_key == second_key  # the retry carried the call's one Idempotency-Key
    assert (first, second) == (503, 200)
    # The answer was lost after the task ran: the retry got that task's result back.
    assert replayed == ("true" if forward_first else None)


# --- batches -------------------------------------------------------------------------------------


def test_batch_runs_every_item_and_streams_results_in_order(client: Dispatcher) -> None:
    picture = PICTURE.read_bytes()
    batch = client.batch(
        [
            {"custom_id": "echo", "model_name": "echo", "input": {"n": 1}},
            {
                "custom_id": "gray",
                "model_name": "grayscale",
                "data": picture,
                "content_type": "image/png",
            },
            {"custom_id": "missing", "model_name": "no_such_model", "input": {}},
            {"custom_id": "linear", "model_name": "linear", "input": {"inputs": [[1, 2, 3]]}},
        ]
    )
    assert batch.info is not None
    assert batch.info.request_counts.total == 4
    info = batch.wait(timeout=60)
    assert info.status == "completed"
    assert (info.request_counts.succeeded, info.request_counts.failed) == (3, 1)
    assert info.finished_at is not None
    echo, gray, missing, linear = batch.results()
    assert [r.custom_id for r in (echo, gray, missing, linear)] == [
        "echo",
        "gray",
        "missing",
        "linear",
    ]
    assert echo.value == {"n": 1}
    assert isinstance(gray.value, Binary)
    assert gray.value.content_type == "image/png"
    with Image.open(io.BytesIO(gray.value)) as image:
        assert image.mode == "L"
    assert not missing.ok
    assert isinstance(missing.error, dc.ModelNotFound)
    assert len(linear.value["outputs"][0]) == 2
    assert client.task(echo.task_id or "").result(timeout=5) == {"n": 1}  # items are tasks
    with pytest.raises(dc.Conflict) as raised:
        batch.cancel()  # it ended
    assert raised.value.code == "batch_finished"


def test_batch_validation_lists_every_bad_item(client: Dispatcher) -> None:
    with pytest.raises(dc.InvalidRequest) as raised:
        client.batch(
            [
                {"custom_id": "ok", "model_name": "echo", "input": 1},
                {"custom_id": "no-model", "input": 1},
                {"custom_id": "ok", "model_name": "echo", "input": 2},
            ]
        )
    assert raised.value.status == 422
    assert sorted(error["index"] for error in raised.value.body["errors"]) == [1, 2]
    with pytest.raises(dc.BatchNotFound):
        client.get_batch(str(uuid.uuid4())).status()


def test_batch_cancel_stops_the_queued_items(client: Dispatcher) -> None:
    requests = [
        {"custom_id": f"s{i}", "model_name": "slow", "input": {"sleep": 0.5}} for i in range(30)
    ]
    batch = client.batch(requests)
    assert batch.cancel().status in ("canceling", "canceled")
    final = batch.wait(timeout=60)
    assert final.status == "canceled"
    counts = final.request_counts
    assert counts.canceled >= 10  # 30 x 0.5 s on two slow workers: most were still queued
    assert counts.succeeded + counts.canceled == 30
    items = list(batch.results())
    assert [r.custom_id for r in items] == [f"s{i}" for i in range(30)]
    assert {r.status for r in items} <= {"succeeded", "canceled"}


def test_async_batch(stack: Stack) -> None:
    async def main() -> list[object]:
        async with AsyncDispatcher(stack.api_url) as client:
            batch = await client.batch(
                [{"custom_id": str(n), "model_name": "echo", "input": n} for n in range(5)]
            )
            assert (await batch.wait(timeout=60)).status == "completed"
            return [item.value async for item in batch.results()]

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]
