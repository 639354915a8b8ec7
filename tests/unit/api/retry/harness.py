"""What the retry tests share: the app on the unit tests' redis-server, and the worker's side
played by the real scripts (task_start, task_finish), as a worker runs them.

Submits record RETRY_KEEP_SECONDS themselves (`retry_keep`, test_a_plain_submit_is_kept_for_retry);
`keep_for_retry` sets it again, for the tests that shorten it, and `keep=False` removes it, as a
record from before retries were kept has none.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import redis.asyncio as aioredis

from api.main import create_app
from api.retry import message_call
from shared.celery_app import encode_message
from shared.errors import ModelNotFound
from shared.priorities import Priority, queue_of
from shared.redis_state.keys import message_key, payload_key, queued_key, task_key
from shared.redis_state.record import NewTask, Outcome
from shared.redis_state.task_scripts import (
    FinishTasks,
    StartTasks,
    StartTerms,
    SubmitTask,
    SubmitTasks,
)
from shared.settings import Settings

KEY, OTHER_KEY = "retry-key-a", "retry-key-b"
AUTH, OTHER = {"X-API-Key": KEY}, {"X-API-Key": OTHER_KEY}
KEEP = 120
TOKEN = "retry-test-token-4f1c"
BIG = bytes(range(256)) * 400  # 100 KiB: claim-checked (over CLAIM_CHECK_BYTES)
DEFAULT_DEPTH = queued_key(queue_of(Priority.default))
TERMS = StartTerms(3, 600, "w1@host", '{"status":504,"msg":"x","code":"expired"}', "{}")


@asynccontextmanager
async def api(config: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, aioredis.Redis]]:
    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://api") as client,
            aioredis.Redis.from_url(config.redis_url, decode_responses=True) as r,
        ):
            yield client, r


def run(main: Any) -> Any:
    return asyncio.run(asyncio.wait_for(main, 60))


async def keep_for_retry(r: aioredis.Redis, task_id: str, seconds: int = KEEP) -> None:
    await r.hset(task_key(task_id), "retry_keep", str(seconds))


async def submit(
    client: httpx.AsyncClient, r: aioredis.Redis, *, keep: bool = True, **fields: Any
) -> str:
    body = {"model_name": "echo", "input": {"x": 1}, **fields}
    answer = await client.post(
        "/dispatch_model", json=body, headers={**AUTH, "Prefer": "respond-async"}
    )
    assert answer.status_code == 202, answer.text
    task_id: str = answer.json()["task_id"]
    if keep:
        await keep_for_retry(r, task_id)
    else:  # a record from before retries were kept (or of RETRY_KEEP_SECONDS=0)
        await r.hdel(task_key(task_id), "retry_keep")
    return task_id


async def submit_bytes(client: httpx.AsyncClient, r: aioredis.Redis, data: bytes = BIG) -> str:
    answer = await client.post(
        "/dispatch_model",
        params={"model_name": "grayscale", "timeout": "30"},
        content=data,
        headers={**AUTH, "Prefer": "respond-async", "Content-Type": "image/png"},
    )
    assert answer.status_code == 202, answer.text
    task_id: str = answer.json()["task_id"]
    await keep_for_retry(r, task_id)
    return task_id


async def fail(r: aioredis.Redis, task_id: str) -> None:
    """What a worker does with a task whose model is unknown: start it, fail it."""
    assert (await StartTasks(r)([task_id], TERMS, now=time_now()))[0][0] == "run"
    outcome = Outcome.failed(task_id, ModelNotFound("no model echo"))
    assert await FinishTasks(r)([outcome], now=time_now(), ttl=600) == [True]


async def succeed(r: aioredis.Redis, task_id: str) -> None:
    await StartTasks(r)([task_id], TERMS, now=time_now())
    await FinishTasks(r)([Outcome.succeeded(task_id, {"ok": 1})], now=time_now(), ttl=600)


def time_now() -> float:
    return time.time()


async def call_of(r: aioredis.Redis, task_id: str) -> dict[str, Any]:
    """The `call` the task's message (its copy, K.message) carries."""
    body = await r.hget(message_key(await r.hget(task_key(task_id), "message") or ""), "body")
    assert body is not None
    call = message_call(body, task_id)
    assert call is not None
    return call


async def queued_ids(r: aioredis.Redis, priority: Priority = Priority.default) -> list[str]:
    """Every task id in the messages of a class's Celery queue."""
    ids = []
    for raw in await r.lrange(queue_of(priority), 0, -1):
        _, kwargs, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
        ids += [task["id"] for task in kwargs["tasks"]]
    return ids


async def raw_payload(config: Settings, task_id: str) -> bytes | None:
    async with aioredis.Redis.from_url(config.redis_url) as raw:
        value: bytes | None = await raw.get(payload_key(task_id))
        return value


async def write_message(
    r: aioredis.Redis, task_ids: list[str], credentials: frozenset[str] = frozenset()
) -> None:
    """One task_submit call of `task_ids` in one message, each with a claim-checked payload
    and retry_keep, as api/store.py writes them; those in `credentials` carry a token."""
    now, queue = time_now(), queue_of(Priority.default)
    new = NewTask("echo", None, "http://ts", now + 60, Priority.default, retry_keep=KEEP)
    entries = [
        {
            "id": t,
            "call": {
                "model_name": "echo",
                "payload": {"key": payload_key(t)},
                "token": TOKEN if t in credentials else None,
            },
            "headers": {},
        }
        for t in task_ids
    ]
    tasks = [
        SubmitTask(
            t,
            queue,
            NewTask(**{**fields_of(new), "credentials": t in credentials}).fields(now, "o"),
            payload=BIG,
        )
        for t in task_ids
    ]
    message = encode_message(entries, queue=queue)
    results = await SubmitTasks(r)(
        tasks, {queue: message}, max_depth=100, ttl=600, idempotency_ttl=600
    )
    assert results == [1] * len(task_ids)


def fields_of(new: NewTask) -> dict[str, Any]:
    return {name: getattr(new, name) for name in NewTask.__dataclass_fields__}
