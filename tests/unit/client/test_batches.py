"""dispatcher_client's batches and its async client against a fake service (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any

import dispatcher_client as dc
import httpx
import pytest
from dispatcher_client import AsyncDispatcher, Binary, Dispatcher

from tests.support.client_fakes import BASE, FAST, PNG, TASK, Fake, accepted, error, task_body


@pytest.fixture
def fake() -> Fake:
    return Fake()


@pytest.fixture
def client(fake: Fake) -> Iterator[Dispatcher]:
    with Dispatcher(BASE, "key-1", retry=FAST, transport=httpx.MockTransport(fake)) as http:
        yield http


# --- batches -------------------------------------------------------------------------------------


BATCH = "b-1"
COUNTS = {
    "total": 3,
    "queued": 0,
    "running": 0,
    "succeeded": 2,
    "failed": 1,
    "canceled": 0,
    "expired": 0,
}


def batch_body(status: str = "in_progress", **counts: int) -> dict[str, Any]:
    return {
        "batch_id": BATCH,
        "status": status,
        "request_counts": {**COUNTS, **counts},
        "status_url": f"/batches/{BATCH}",
    }


def results_jsonl() -> bytes:
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    lines = [
        {"custom_id": "a", "task_id": "t1", "status": "succeeded", "prediction_value": {"n": 1}},
        {"custom_id": "b", "task_id": "t2", "status": "succeeded", "prediction_value": uri},
        {
            "custom_id": "c",
            "task_id": "t3",
            "status": "failed",
            "error": {"status": 404, "msg": "Model not found: nope", "code": "model_not_found"},
        },
    ]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines) + b"\n"


def test_batch_submit_status_results_cancel(fake: Fake, client: Dispatcher) -> None:
    fake.on(
        "POST", "/batches", httpx.Response(202, json=batch_body(queued=3, succeeded=0, failed=0))
    )
    fake.on("GET", f"/batches/{BATCH}", httpx.Response(200, json=batch_body("completed")))
    fake.on(
        "GET",
        f"/batches/{BATCH}/results",
        httpx.Response(200, content=results_jsonl(), headers={"Content-Type": "application/jsonl"}),
    )
    fake.on("DELETE", f"/batches/{BATCH}", httpx.Response(200, json=batch_body("completed")))
    batch = client.batch(
        [
            {"custom_id": "a", "model_name": "echo", "input": {"n": 1}},
            {"custom_id": "b", "model_name": "mirror", "data": PNG, "content_type": "image/png"},
            {"custom_id": "c", "model_name": "nope", "input": 1, "version": "2"},
        ],
        webhook="https://hooks.example.com/x",
    )
    sent = json.loads(fake.requests[0].content)
    assert sent["webhook"] == "https://hooks.example.com/x"
    assert "webhook_events" not in sent
    assert sent["requests"][1] == {
        "custom_id": "b",
        "model_name": "mirror",
        "data": "data:image/png;base64," + base64.b64encode(PNG).decode(),
    }
    assert sent["requests"][2]["model_version"] == "2"
    assert fake.requests[0].headers["idempotency-key"]
    assert batch.batch_id == BATCH
    assert batch.info is not None
    assert batch.info.request_counts.queued == 3
    assert batch.wait(timeout=5).done
    a, b, c = batch.results()
    assert (a.custom_id, a.ok, a.value) == ("a", True, {"n": 1})
    assert isinstance(b.value, Binary)
    assert b.value == PNG
    assert (c.ok, type(c.error), c.task_id) == (False, dc.ModelNotFound, "t3")
    assert batch.cancel().status == "completed"


def test_a_batch_422_lists_every_bad_item(fake: Fake, client: Dispatcher) -> None:
    bad = [
        {"index": 0, "custom_id": "a", "code": "invalid_request", "msg": "model_name: missing"},
        {"index": 2, "code": "invalid_request", "msg": "custom_id: missing"},
    ]
    body = {"status": 422, "msg": "2 of 3 requests are invalid", "code": "invalid_request"}
    fake.on("POST", "/batches", httpx.Response(422, json={**body, "errors": bad}))
    with pytest.raises(dc.InvalidRequest) as raised:
        client.batch([{"custom_id": "a"}, {"custom_id": "b", "model_name": "echo"}, {}])
    assert raised.value.body["errors"] == bad
    assert len(fake.requests) == 1


def test_batch_results_stream_retries_a_503_before_it_starts(
    fake: Fake, client: Dispatcher
) -> None:
    fake.on(
        "GET",
        f"/batches/{BATCH}/results",
        httpx.Response(503, headers={"Retry-After": "0"}),
        httpx.Response(200, content=results_jsonl()),
    )
    assert [r.custom_id for r in client.get_batch(BATCH).results()] == ["a", "b", "c"]


# --- async ---------------------------------------------------------------------------------------


def test_async_client_shares_the_flows(fake: Fake) -> None:
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    fake.on(
        "POST",
        "/dispatch_model",
        error(429, "queue_full", **{"Retry-After": "0"}),
        accepted(),
    )
    fake.on("GET", f"/tasks/{TASK}", httpx.Response(200, json=task_body(prediction_value=uri)))
    fake.on(
        "GET",
        f"/tasks/{TASK}/result",
        httpx.Response(200, content=PNG, headers={"Content-Type": "image/png"}),
    )
    fake.on("GET", f"/batches/{BATCH}/results", httpx.Response(200, content=results_jsonl()))

    async def main() -> tuple[Any, list[str]]:
        transport = httpx.MockTransport(fake)
        async with AsyncDispatcher(BASE, retry=FAST, transport=transport) as client:
            value = await client.predict("grayscale", data=PNG, content_type="image/png")
            ids = [r.custom_id async for r in client.get_batch(BATCH).results()]
            return value, ids

    value, ids = asyncio.run(main())
    assert value == PNG
    assert isinstance(value, Binary)
    assert ids == ["a", "b", "c"]
    posts = fake.made("POST", "/dispatch_model")
    assert len(posts) == 2
    assert posts[0].headers["idempotency-key"] == posts[1].headers["idempotency-key"]


def test_async_errors_are_typed(fake: Fake) -> None:
    fake.on("POST", "/dispatch_model", error(404, "model_not_found"))

    async def main() -> None:
        async with AsyncDispatcher(BASE, transport=httpx.MockTransport(fake)) as client:
            await client.predict("nope", 1)

    with pytest.raises(dc.ModelNotFound):
        asyncio.run(main())
