"""dispatcher_client and the backends: `backend=` and `operation=` in every form and in batch
items, the task's backend, `backends()`, and the backend error codes (a fake service,
httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from urllib.parse import parse_qs

import dispatcher_client as dc
import httpx
import pytest
from dispatcher_client import AsyncDispatcher, Dispatcher

from tests.support.client_fakes import BASE, FAST, PNG, TASK, Fake, accepted, error, task_body

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
LISTING = {
    "backends": [
        {
            "name": "torchserve", "protocol": "torchserve", "origin": "http://ts:8080",
            "default": True, "gates_readiness": True, "operations": ["predictions"],
            "health": "ok", "takes_bytes": True, "models": None,
            "models_error": "TorchServe's inference API does not list models",
        },
        {
            "name": "llm", "protocol": "openai", "origin": "http://vllm:8000", "default": False,
            "gates_readiness": False, "operations": ["chat.completions", "embeddings"],
            "health": "unreachable at http://vllm:8000 (ConnectError)", "takes_bytes": False,
            "models": ["qwen"], "models_error": None,
        },
    ]
}  # fmt: skip


@pytest.fixture
def fake() -> Fake:
    return Fake()


@pytest.fixture
def client(fake: Fake) -> Iterator[Dispatcher]:
    with Dispatcher(BASE, "key-1", retry=FAST, transport=httpx.MockTransport(fake)) as http:
        yield http


def test_predict_names_the_backend_and_operation_in_json(fake: Fake, client: Dispatcher) -> None:
    answer = task_body(prediction_value={"choices": []}, backend="llm")
    fake.on("POST", "/dispatch_model", httpx.Response(200, json=answer))
    client.predict("qwen", CHAT, backend="llm", operation="chat.completions")
    assert json.loads(fake.requests[0].content) == {
        "model_name": "qwen",
        "input": CHAT,
        "backend": "llm",
        "operation": "chat.completions",
    }
    client.predict("echo", {"a": 1})  # neither: the server's defaults
    assert "backend" not in json.loads(fake.requests[1].content)


def test_bytes_name_them_in_the_query(fake: Fake, client: Dispatcher) -> None:
    fake.on("POST", "/dispatch_model", httpx.Response(200, json=task_body(prediction_value=1)))
    client.predict("digest", data=PNG, content_type="image/png", backend="mls", operation="infer")
    assert parse_qs(fake.requests[0].url.query.decode()) == {
        "model_name": ["digest"],
        "backend": ["mls"],
        "operation": ["infer"],
    }


def test_submit_and_the_task_say_where_it_went(fake: Fake, client: Dispatcher) -> None:
    fake.on("POST", "/dispatch_model", accepted())
    fake.on(
        "GET",
        f"/tasks/{TASK}",
        httpx.Response(200, json=task_body("queued", backend="mls", operation="generate")),
    )
    task = client.submit("m", {"text_input": "hi"}, backend="mls", operation="generate")
    sent = json.loads(fake.requests[0].content)
    assert (sent["backend"], sent["operation"]) == ("mls", "generate")
    info = task.status()
    assert (info.backend, info.operation) == ("mls", "generate")
    assert dc.TaskInfo.from_json(task_body()).backend is None  # an older server names none


def test_batch_items_name_their_own_backend(fake: Fake, client: Dispatcher) -> None:
    body = {
        "batch_id": "b-1",
        "status": "in_progress",
        "created_at": "2026-01-01T00:00:00Z",
        "request_counts": {"total": 2, "queued": 2, "running": 0, "succeeded": 0,
                           "failed": 0, "canceled": 0, "expired": 0},
    }  # fmt: skip
    fake.on("POST", "/batches", httpx.Response(202, json=body))
    client.batch(
        [
            {"custom_id": "a", "model_name": "qwen", "input": CHAT, "backend": "llm"},
            {"custom_id": "b", "model_name": "echo", "input": 1},
        ]
    )
    items = json.loads(fake.requests[0].content)["requests"]
    assert [item.get("backend") for item in items] == ["llm", None]


def test_backends_lists_the_servers_backends(fake: Fake, client: Dispatcher) -> None:
    fake.on("GET", "/backends", httpx.Response(200, json=LISTING))
    torchserve, llm = client.backends()
    assert (torchserve.name, torchserve.default, torchserve.healthy) == ("torchserve", True, True)
    assert torchserve.models is None
    assert (llm.protocol, llm.healthy, llm.models, llm.takes_bytes) == (
        "openai",
        False,
        ("qwen",),
        False,
    )
    assert llm.operations == ("chat.completions", "embeddings")
    assert fake.requests[0].headers["authorization"] == "Bearer key-1"


def test_the_async_client_too(fake: Fake) -> None:
    fake.on("GET", "/backends", httpx.Response(200, json=LISTING))
    fake.on("POST", "/dispatch_model", httpx.Response(200, json=task_body(prediction_value=2)))

    async def run() -> tuple[list[dc.BackendInfo], object]:
        transport = httpx.MockTransport(fake)
        async with AsyncDispatcher(BASE, retry=FAST, transport=transport) as client:
            listed = await client.backends()
            return listed, await client.predict("m", CHAT, backend="llm", operation="completions")

    listed, value = asyncio.run(run())
    assert [b.name for b in listed] == ["torchserve", "llm"]
    assert value == 2
    sent = json.loads(fake.made("POST", "/dispatch_model")[0].content)
    assert (sent["backend"], sent["operation"]) == ("llm", "completions")


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (422, "unknown_backend", dc.InvalidRequest),
        (422, "unsupported_operation", dc.InvalidRequest),
        (502, "backend_error", dc.ModelFailed),
        (502, "backend_auth_rejected", dc.ModelFailed),
        (503, "backend_unavailable", dc.ServiceUnavailable),
        (503, "backend_not_configured", dc.ServiceUnavailable),
        (504, "backend_timeout", dc.TaskTimeout),
    ],
)
def test_backend_error_codes_map_to_their_class(
    fake: Fake, client: Dispatcher, status: int, code: str, cls: type[dc.DispatcherError]
) -> None:
    fake.on("POST", "/dispatch_model", error(status, code, TASK))
    with pytest.raises(dc.DispatcherError) as raised:
        client.predict("echo", 1, backend="x")
    assert type(raised.value) is cls
    assert raised.value.code == code
