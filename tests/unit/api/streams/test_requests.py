"""`stream: true` in the requests: the stream URL in every form, a dispatch answered by its stream,
the operations that cannot stream, the route's OpenAPI entry, and the SSE encoding itself."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from api import sse
from api.main import create_app
from shared.redis_state.keys import TASK_KEY_PREFIX
from shared.settings import Settings
from tests.unit.api.streams.harness import AUTH, CHAT, DONE, OUTPUT, Worker, api, events_of


def test_a_streamed_dispatch_that_waits_and_accepts_sse_is_answered_by_the_stream(
    config: Settings, run: Any
) -> None:
    async def main() -> tuple[str, httpx.Response, list[str]]:
        worker = Worker(config.redis_url)
        body = {"model_name": "echo", "input": {"x": 1}, "stream": True}
        headers = {**AUTH, "Accept": "text/event-stream", "Prefer": "wait=30"}
        async with api(config) as client:
            posting = asyncio.create_task(
                client.post("/dispatch_model", json=body, headers=headers)
            )
            task_id = ""
            for _ in range(100):  # the task's id, from its record, once it is submitted
                keys = await worker.client.keys(TASK_KEY_PREFIX + "*")
                if keys:
                    task_id = keys[0].removeprefix(TASK_KEY_PREFIX)
                    break
                await asyncio.sleep(0.02)
            ids = [await worker(task_id, OUTPUT, '"a"'), await worker(task_id, DONE, "{}")]
            response = await posting
        await worker.aclose()
        return task_id, response, ids

    task_id, response, ids = run(main())
    assert [e["id"] for e in events_of(response)] == ids
    assert response.headers["content-location"] == f"/tasks/{task_id}/stream"
    assert response.headers["preference-applied"] == "wait=30"


def test_stream_field_gives_stream_url_in_every_form(config: Settings, run: Any) -> None:
    async def main() -> list[httpx.Response]:
        prefer = {**AUTH, "Prefer": "respond-async"}
        async with api(config) as client:
            return [
                await client.post(
                    "/dispatch_model", json={"model_name": "echo", "stream": True}, headers=prefer
                ),
                await client.post(
                    "/dispatch_model",
                    data={"model_name": "echo", "stream": "true"},
                    files={"data": ("x.bin", b"\x00\x01", "application/octet-stream")},
                    headers=prefer,
                ),
                await client.post(
                    "/dispatch_model",
                    params={"model_name": "echo", "stream": "true"},
                    content=b"\x00",
                    headers={**prefer, "Content-Type": "application/octet-stream"},
                ),
                await client.post("/dispatch_model", json={"model_name": "echo"}, headers=prefer),
            ]

    *streamed, plain = run(main())
    for response in streamed:
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["stream_url"] == f"/tasks/{body['task_id']}/stream"
        assert body["status_url"] == f"/tasks/{body['task_id']}"
    assert plain.status_code == 202
    assert "stream_url" not in plain.json()


def test_stream_refused_where_it_cannot_stream_and_input_stream_points_to_it(
    config: Settings, run: Any
) -> None:
    async def main() -> list[httpx.Response]:
        prefer = {**AUTH, "Prefer": "respond-async"}

        async def post(**body: Any) -> httpx.Response:
            return await client.post("/dispatch_model", json=body, headers=prefer)

        async with api(config) as client:
            return [
                await post(
                    model_name="m",
                    backend="llm",
                    operation="embeddings",
                    input={"input": "x"},
                    stream=True,
                ),
                await post(model_name="m", backend="llm", input={**CHAT, "stream": True}),
                await post(model_name="m", backend="llm", input=CHAT, stream=True),
                await post(model_name="m", backend="llm", input={**CHAT, "stream": False}),
            ]

    embeddings, input_stream, chat, not_streamed = run(main())
    assert embeddings.status_code == 422
    assert embeddings.json()["code"] == "unsupported_operation"
    assert "embeddings" in embeddings.json()["msg"]
    assert "cannot stream" in embeddings.json()["msg"]
    assert input_stream.status_code == 422
    assert "stream field" in input_stream.json()["msg"]
    assert chat.status_code == 202
    assert "stream_url" in chat.json()
    assert not_streamed.status_code == 202
    assert "stream_url" not in not_streamed.json()


def test_the_route_is_documented_as_an_event_stream(config: Settings) -> None:
    schema = create_app(config).openapi()
    operation = schema["paths"]["/tasks/{task_id}/stream"]["get"]
    assert "text/event-stream" in operation["responses"]["200"]["content"]
    assert {"204", "404", "422"} <= set(operation["responses"])
    names = {(p["in"], p["name"]) for p in operation["parameters"]}
    assert {("header", "Last-Event-ID"), ("query", "last_event_id")} <= names
    request = schema["components"]["schemas"]["PredictionRequest"]["properties"]
    assert (request["stream"]["type"], request["stream"]["default"]) == ("boolean", False)
    accepted = schema["components"]["schemas"]["Accepted"]["properties"]
    assert "stream_url" in accepted


def test_sse_encoding_splits_lines_and_refuses_forged_fields() -> None:
    assert sse.encode("output", "a\r\nb\rc\nd", "1-0") == (
        b"event: output\nid: 1-0\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    )
    assert sse.encode("done", "") == b"event: done\ndata: \n\n"
    with pytest.raises(ValueError, match="line end"):
        sse.encode("output", "x", "1-0\nevent: done")
    with pytest.raises(ValueError, match="one line"):
        sse.comment("two\nlines")
