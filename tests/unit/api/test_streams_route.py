"""`GET /tasks/{id}/stream` through the real app (ASGI) on a real redis-server: the worker's side
is simulated by appending with the real script (AppendToStream), as a streaming worker does.

httpx's ASGITransport hands back a response once its body is complete, so a stream is read
whole: entries appended while it is open (a concurrent task) show the hub's live delivery.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
import pytest
import redis.asyncio as aioredis

from api import sse
from api.main import create_app
from api.routes.streams import SYNTHETIC_ID
from devstack.processes import free_port
from devstack.redis import RedisServer
from shared.redis_state.keys import TASK_KEY_PREFIX
from shared.redis_state.stream_scripts import AppendToStream, StreamLimits
from shared.redis_state.streams import StreamKind
from shared.settings import Settings

T = TypeVar("T")
KEY, OTHER_KEY = "stream-key-a", "stream-key-b"
AUTH = {"X-API-Key": KEY}
LIMITS = StreamLimits(max_entries=1_000, max_bytes=1_000_000, ttl=600)
OUTPUT, RESTART, ERROR, DONE = (
    StreamKind.output,
    StreamKind.restart,
    StreamKind.error,
    StreamKind.done,
)
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
BACKENDS = {"llm": {"url": "http://127.0.0.1:9", "protocol": "openai"}}


@pytest.fixture
def config(bare_redis: RedisServer, clean_env: None) -> Settings:
    client = bare_redis.client()
    client.flushall()
    client.close()
    return Settings(
        _env_file=None,
        redis_url=bare_redis.url,
        torchserve_url=f"http://127.0.0.1:{free_port()}",
        dispatcher_api_keys=f"{KEY},{OTHER_KEY}",
        backends=json.dumps(BACKENDS),
    )


@pytest.fixture
def run() -> Callable[[Awaitable[T]], T]:
    def runner(main: Awaitable[T]) -> T:
        return asyncio.run(asyncio.wait_for(main, 30))

    return runner


@asynccontextmanager
async def api(config: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


class Worker:
    """A streaming worker's appends, through the real script on a client of its own."""

    def __init__(self, url: str) -> None:
        self.client = aioredis.Redis.from_url(url, decode_responses=True)
        self.script = AppendToStream(self.client)

    async def __call__(self, task_id: str, kind: StreamKind, data: str, attempt: int = 1) -> str:
        appended = await self.script(task_id, kind, data, attempt=attempt, limits=LIMITS)
        return appended.ids[-1]

    async def aclose(self) -> None:
        await self.client.aclose()


def parse(body: str) -> list[dict[str, str]]:
    """The events of an SSE body (as an EventSource reads them); comments as {"comment": ...}."""
    events = []
    for block in body.split("\n\n"):
        if not block:
            continue
        event: dict[str, str] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            if name == "data" and "data" in event:
                event["data"] += "\n" + value
            else:
                event[name or "comment"] = value
        events.append(event)
    return events


def events_of(response: httpx.Response) -> list[dict[str, str]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return [e for e in parse(response.text) if "event" in e]


async def submit(client: httpx.AsyncClient, headers: dict[str, str] = AUTH, **fields: Any) -> str:
    body = {"model_name": "echo", "input": {"x": 1}, "stream": True, **fields}
    response = await client.post(
        "/dispatch_model", json=body, headers={**headers, "Prefer": "respond-async"}
    )
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def test_live_events_in_order_with_their_ids_then_done(config: Settings, run: Any) -> None:
    async def main() -> tuple[list[str], list[dict[str, str]]]:
        worker = Worker(config.redis_url)
        async with api(config) as client:
            task_id = await submit(client)
            reading = asyncio.create_task(client.get(f"/tasks/{task_id}/stream", headers=AUTH))
            await asyncio.sleep(0.3)  # the reader waits in the hub before anything is appended
            assert not reading.done()
            ids = [
                await worker(task_id, OUTPUT, '{"text": "Hel"}'),
                await worker(task_id, OUTPUT, "line one\nline two"),
                await worker(task_id, RESTART, '{"attempt": 2}', attempt=2),
                await worker(task_id, OUTPUT, '{"text": "Hello"}', attempt=2),
                await worker(task_id, DONE, '{"status": "succeeded"}', attempt=2),
            ]
            response = await reading
        await worker.aclose()
        return ids, events_of(response)

    ids, events = run(main())
    restart_mark = events[2]["id"]  # the restart mark's own id (the script writes it first)
    assert [e["event"] for e in events] == ["output", "output", "restart", "output", "done"]
    assert [e["id"] for e in events] == [ids[0], ids[1], restart_mark, ids[3], ids[4]]
    assert events[0]["data"] == '{"text": "Hel"}'  # JSON as the worker wrote it
    assert events[1]["data"] == "line one\nline two"  # one data line per line, joined back
    assert events[4]["data"] == '{"status": "succeeded"}'


def test_resume_after_last_event_id_header_wins_over_query(config: Settings, run: Any) -> None:
    async def main() -> tuple[list[str], dict[str, list[dict[str, str]]]]:
        worker = Worker(config.redis_url)
        async with api(config) as client:
            task_id = await submit(client)
            ids = [await worker(task_id, OUTPUT, f'"{n}"') for n in range(4)]
            ids.append(await worker(task_id, ERROR, '{"status": 502, "code": "backend_failed"}'))
            url = f"/tasks/{task_id}/stream"
            seen = {
                "header": events_of(
                    await client.get(url, headers={**AUTH, "Last-Event-ID": ids[1]})
                ),
                "query": events_of(
                    await client.get(url, params={"last_event_id": ids[2]}, headers=AUTH)
                ),
                "both": events_of(
                    await client.get(
                        url,
                        params={"last_event_id": ids[0]},
                        headers={**AUTH, "Last-Event-ID": ids[3]},
                    )
                ),
                "late": events_of(await client.get(url, headers=AUTH)),
                "empty id": events_of(await client.get(url, headers={**AUTH, "Last-Event-ID": ""})),
            }
        await worker.aclose()
        return ids, seen

    ids, seen = run(main())
    assert [e["id"] for e in seen["header"]] == ids[2:]
    assert [e["id"] for e in seen["query"]] == ids[3:]
    assert [e["id"] for e in seen["both"]] == ids[4:]
    # A reader after the end gets the whole history, then the ending (here the error).
    assert [e["id"] for e in seen["late"]] == ids
    assert [e["id"] for e in seen["empty id"]] == ids  # an empty id is none: from the first
    assert [e["event"] for e in seen["late"]] == ["output"] * 4 + ["error"]
    assert json.loads(seen["late"][-1]["data"])["code"] == "backend_failed"


def test_a_reconnect_after_the_end_gets_204_not_a_hang(config: Settings, run: Any) -> None:
    async def main() -> list[int]:
        worker = Worker(config.redis_url)
        async with api(config) as client:
            task_id = await submit(client)
            first = await worker(task_id, OUTPUT, '"a"')
            done = await worker(task_id, DONE, "{}")
            url = f"/tasks/{task_id}/stream"
            statuses = [
                (await client.get(url, headers={**AUTH, "Last-Event-ID": done})).status_code,
                (await client.get(url, params={"last_event_id": done}, headers=AUTH)).status_code,
                (await client.get(url, headers={**AUTH, "Last-Event-ID": first})).status_code,
            ]
        await worker.aclose()
        return statuses

    assert run(main()) == [204, 204, 200]


def test_keep_alive_comments_while_the_stream_is_idle(
    config: Settings, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sse, "KEEPALIVE_SECONDS", 0.05)

    async def main() -> str:
        worker = Worker(config.redis_url)
        async with api(config) as client:
            task_id = await submit(client)
            reading = asyncio.create_task(client.get(f"/tasks/{task_id}/stream", headers=AUTH))
            await worker(task_id, OUTPUT, '"a"')
            await asyncio.sleep(0.4)
            await worker(task_id, DONE, "{}")
            response = await reading
        await worker.aclose()
        return response.text

    body = run(main())
    blocks = parse(body)
    assert blocks[0] == {"retry": str(sse.RETRY_MS)}
    after_output = blocks[[b.get("event") for b in blocks].index("output") + 1 :]
    keepalives = [b for b in after_output if b.get("comment") == "keep-alive"]
    assert len(keepalives) >= 3  # ~8 in 0.4 s at one per 0.05 s
    assert after_output[-1]["event"] == "done"


@pytest.mark.parametrize("streamed", [False, True])
def test_a_task_canceled_while_queued_gets_one_final_event(
    config: Settings, run: Any, streamed: bool
) -> None:
    """Not streamed: one event from the record (SYNTHETIC_ID). Streamed: its cancel wrote the
    stream's `done` (lib.lua end_stream), whose view the API reads from the record."""

    async def main() -> tuple[str, list[dict[str, str]], int, list[dict[str, str]]]:
        async with api(config) as client:
            task_id = await submit(client, stream=streamed)  # no worker runs: it stays queued
            url = f"/tasks/{task_id}/stream"
            reading = asyncio.create_task(client.get(url, headers=AUTH))
            await asyncio.sleep(0.3)
            canceled = await client.delete(f"/tasks/{task_id}", headers=AUTH)
            assert canceled.status_code == 200, canceled.text
            waiting = events_of(await reading)
            last = waiting[-1]["id"]
            again = await client.get(url, headers={**AUTH, "Last-Event-ID": last})
            late = events_of(await client.get(url, headers=AUTH))
        return task_id, waiting, again.status_code, late

    task_id, waiting, again, late = run(main())
    assert waiting == late
    assert [e["event"] for e in waiting] == ["done"]
    assert (waiting[0]["id"] == SYNTHETIC_ID) is not streamed
    view = json.loads(waiting[0]["data"])
    assert (view["task_id"], view["status"]) == (task_id, "canceled")
    assert again == 204


def test_same_rules_as_the_task_bad_ids_unknown_and_other_tenants(
    config: Settings, run: Any
) -> None:
    async def main() -> dict[str, httpx.Response]:
        async with api(config) as client:
            task_id = await submit(client)
            url = f"/tasks/{task_id}/stream"
            return {
                "no key": await client.get(url),
                "other tenant": await client.get(url, headers={"X-API-Key": OTHER_KEY}),
                "unknown": await client.get("/tasks/0000-unknown/stream", headers=AUTH),
                "bad header": await client.get(url, headers={**AUTH, "Last-Event-ID": "x\x01"}),
                "bad query": await client.get(url, params={"last_event_id": "12"}, headers=AUTH),
                "out of range": await client.get(
                    url, params={"last_event_id": f"{2**64}-0"}, headers=AUTH
                ),
            }

    answers = run(main())
    assert answers["no key"].status_code == 401
    for name in ("other tenant", "unknown"):
        assert answers[name].status_code == 404, name
        assert answers[name].json()["code"] == "task_not_found"
    for name in ("bad query", "out of range"):
        assert answers[name].status_code == 422, name
        assert "last_event_id: not an event id of this stream" in answers[name].json()["msg"]
        assert "12" not in answers[name].json()["msg"]  # the value is not echoed
    assert answers["bad header"].status_code == 422
    assert "Last-Event-ID: not an event id" in answers["bad header"].json()["msg"]


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
