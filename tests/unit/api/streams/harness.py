"""What the stream route tests share: the app on the unit tests' redis-server, and a streaming
worker's appends through the real script (AppendToStream)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
import redis.asyncio as aioredis

from api.main import create_app
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
