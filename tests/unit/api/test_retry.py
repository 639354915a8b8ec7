"""`POST /tasks/{id}/retry` through the real app (ASGI) on a real redis-server. The worker's side
is played by the real scripts (task_start, task_finish), as a worker runs them.

Submits record RETRY_KEEP_SECONDS themselves (`retry_keep`, test_a_plain_submit_is_kept_for_retry);
`keep_for_retry` sets it again, for the tests that shorten it, and `keep=False` removes it, as a
record from before retries were kept has none.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from api.main import create_app
from api.retry import message_call
from devstack.processes import free_port
from devstack.redis import RedisServer
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


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(Path(tmp_path_factory.mktemp("retry-redis")), appendonly=False) as server:
        yield server


@pytest.fixture
def config(redis_server: RedisServer, clean_env: None) -> Settings:
    client = redis_server.client()
    client.flushall()
    client.close()
    return Settings(
        _env_file=None,
        redis_url=redis_server.url,
        torchserve_url=f"http://127.0.0.1:{free_port()}",
        dispatcher_api_keys=f"{KEY},{OTHER_KEY}",
        retry_keep_seconds=KEEP,
    )


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
    assert (await StartTasks(r)([task_id], TERMS, now=_now()))[0][0] == "run"
    outcome = Outcome.failed(task_id, ModelNotFound("no model echo"))
    assert await FinishTasks(r)([outcome], now=_now(), ttl=600) == [True]


async def succeed(r: aioredis.Redis, task_id: str) -> None:
    await StartTasks(r)([task_id], TERMS, now=_now())
    await FinishTasks(r)([Outcome.succeeded(task_id, {"ok": 1})], now=_now(), ttl=600)


def _now() -> float:
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


# --- a retry is a new task with the same request and payload, linked both ways ---------------


def test_a_failed_task_is_retried_with_the_same_request_and_payload(config: Settings) -> None:
    async def main() -> None:
        async with api(config) as (client, r):
            old = await submit_bytes(client, r)
            first = await call_of(r, old)
            await fail(r, old)
            assert await raw_payload(config, old) == BIG  # kept by its ending
            assert 0 < await r.ttl(payload_key(old)) <= KEEP

            answer = await client.post(f"/tasks/{old}/retry", headers=AUTH)
            assert answer.status_code == 202, answer.text
            new = answer.json()
            assert answer.headers["location"] == f"/tasks/{new['task_id']}"
            assert (new["status"], new["retry_of"], new["retried_as"]) == ("queued", old, None)
            assert new["model_name"] == "grayscale"
            assert new["task_id"] != old

            seen = (await client.get(f"/tasks/{old}", headers=AUTH)).json()
            assert (seen["status"], seen["retried_as"], seen["retry_of"]) == (
                "failed", new["task_id"], None,
            )  # fmt: skip
            again = (await client.get(f"/tasks/{new['task_id']}", headers=AUTH)).json()
            assert again["retry_of"] == old

            # The same call but for its times and its payload's key; the same bytes.
            call = await call_of(r, new["task_id"])
            assert call["payload"]["key"] == payload_key(new["task_id"])
            assert await raw_payload(config, new["task_id"]) == BIG
            assert await raw_payload(config, old) is None  # the retry holds its own copy now
            same = ("payload", "deadline", "submitted_at")
            assert {k: v for k, v in call.items() if k not in same} == {
                k: v for k, v in first.items() if k not in same
            }
            assert call["payload"]["parts"] == first["payload"]["parts"]
            assert call["deadline"] - call["submitted_at"] == pytest.approx(
                first["deadline"] - first["submitted_at"]
            )
            assert new["task_id"] in await queued_ids(r)  # enqueued like any submit
            assert await r.get(DEFAULT_DEPTH) == "1"

    run(main())


def test_a_second_retry_answers_the_first_retry(config: Settings) -> None:
    async def main() -> None:
        async with api(config) as (client, r):
            old = await submit(client, r)
            await fail(r, old)
            first = await client.post(f"/tasks/{old}/retry", headers=AUTH)
            assert first.status_code == 202
            new = first.json()["task_id"]
            await succeed(r, new)
            second = await client.post(f"/tasks/{old}/retry", headers=AUTH)
            assert second.status_code == 200, second.text
            assert (second.json()["task_id"], second.json()["status"]) == (new, "succeeded")
            assert sorted(await queued_ids(r)) == sorted([old, new])  # nothing more pushed

    run(main())


def test_concurrent_retries_create_one_task(config: Settings) -> None:
    """Twelve at once in one API process (one group commit) and in a second one."""

    async def main() -> None:
        async with api(config) as (client, r), api(config) as (other_process, _):
            old = await submit(client, r)
            await fail(r, old)
            answers = await asyncio.gather(
                *(c.post(f"/tasks/{old}/retry", headers=AUTH) for c in [client, other_process] * 6)
            )
            codes = sorted(a.status_code for a in answers)
            assert codes == [200] * 11 + [202], [a.text for a in answers]
            ids = {a.json()["task_id"] for a in answers}
            assert len(ids) == 1
            (new,) = ids
            assert (await client.get(f"/tasks/{old}", headers=AUTH)).json()["retried_as"] == new
            # A group's message carries every retry of it; only the one recorded has a record
            # (a worker skips the others as `missing`).
            others = [i for i in await queued_ids(r) if i not in (old, new)]
            assert [i for i in others if await r.exists(task_key(i))] == []
            assert await r.get(DEFAULT_DEPTH) == "1"
            assert await r.zcard("dispatch:open") == 1

    run(main())


def test_canceled_and_expired_tasks_are_retried(config: Settings) -> None:
    async def main() -> None:
        async with api(config) as (client, r):
            canceled = await submit(client, r)
            assert (await client.delete(f"/tasks/{canceled}", headers=AUTH)).status_code == 200
            expired = await submit(client, r, timeout=0.05)
            deadline = float(await r.hget(task_key(expired), "deadline") or 0)
            await asyncio.sleep(deadline - _now() + 0.01)  # past it: the next read settles it
            assert (await client.get(f"/tasks/{expired}", headers=AUTH)).json()["status"] == (
                "expired"
            )
            for old in (canceled, expired):
                answer = await client.post(f"/tasks/{old}/retry", headers=AUTH)
                assert answer.status_code == 202, answer.text
                assert answer.json()["retry_of"] == old
            retried = (await client.post(f"/tasks/{expired}/retry", headers=AUTH)).json()
            created = _parse_time(retried["created_at"])
            length = _parse_time(retried["deadline"]) - created
            assert length == pytest.approx(0.05, abs=0.01)  # the same timeout as the first

    run(main())


def _parse_time(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def test_a_batch_item_is_retried_as_a_task_of_its_own(config: Settings) -> None:
    async def main() -> None:
        async with api(config) as (client, r):
            created = await client.post(
                "/batches",
                json={"requests": [{"custom_id": "a", "model_name": "echo", "input": 1}]},
                headers=AUTH,
            )
            assert created.status_code in (200, 201, 202), created.text
            batch = created.json()["batch_id"]
            item = f"{batch}-0"
            await keep_for_retry(r, item)
            assert (await client.delete(f"/batches/{batch}", headers=AUTH)).status_code == 200
            assert (await client.get(f"/tasks/{item}", headers=AUTH)).json()["status"] == (
                "canceled"
            )
            answer = await client.post(f"/tasks/{item}/retry", headers=AUTH)
            assert answer.status_code == 202, answer.text
            new = answer.json()
            assert (new["batch_id"], new["custom_id"], new["retry_of"]) == (None, None, item)
            assert new["priority"] == "batch"
            view = (await client.get(f"/batches/{batch}", headers=AUTH)).json()
            assert view["request_counts"]["total"] == 1  # the batch stays as it ended

    run(main())


# --- what cannot be retried ----------------------------------------------------------------


def test_only_failed_expired_or_canceled_tasks_are_retried(config: Settings) -> None:
    async def main() -> None:
        async with api(config) as (client, r):
            queued = await submit(client, r)
            answer = await client.post(f"/tasks/{queued}/retry", headers=AUTH)
            assert answer.status_code == 409
            body = answer.json()
            assert body["code"] == "not_retryable"
            assert "is queued" in body["msg"]
            assert "failed, expired or canceled" in body["msg"]
            await succeed(r, queued)
            answer = await client.post(f"/tasks/{queued}/retry", headers=AUTH)
            assert (answer.status_code, answer.json()["code"]) == (409, "not_retryable")
            assert "is succeeded" in answer.json()["msg"]

    run(main())


def test_unknown_tasks_and_other_owners_tasks_are_404(config: Settings) -> None:
    async def main() -> None:
        async with api(config) as (client, r):
            old = await submit(client, r)
            await fail(r, old)
            for task_id, headers in (("no-such-task", AUTH), (old, OTHER)):
                answer = await client.post(f"/tasks/{task_id}/retry", headers=headers)
                assert (answer.status_code, answer.json()["code"]) == (404, "task_not_found")
            assert (await client.post(f"/tasks/{old}/retry")).status_code == 401
            assert await r.hget(task_key(old), "retried_as") is None

    run(main())


def test_a_request_no_longer_kept_is_a_clear_409(config: Settings) -> None:
    async def main() -> None:
        async with api(config) as (client, r):
            payload_gone = await submit_bytes(client, r)
            await fail(r, payload_gone)
            await r.delete(payload_key(payload_gone))  # as when its keep ran out
            message_gone = await submit(client, r)
            await fail(r, message_gone)
            await r.delete(message_key(message_gone))
            never_kept = await submit(client, r, keep=False)
            await fail(r, never_kept)
            assert await r.exists(message_key(never_kept)) == 0  # its ending deleted the copy
            for old in (payload_gone, message_gone, never_kept):
                answer = await client.post(f"/tasks/{old}/retry", headers=AUTH)
                assert answer.status_code == 409, answer.text
                body = answer.json()
                assert body["code"] == "retry_unavailable"
                assert "no longer kept" in body["msg"]
                assert "submit it again" in body["msg"]
            assert await r.get(DEFAULT_DEPTH) == "0"

    run(main())


def test_retry_off_is_always_409(config: Settings) -> None:
    off = config.model_copy(update={"retry_keep_seconds": 0})

    async def main() -> None:
        async with api(off) as (client, r):
            old = await submit(client, r)
            await fail(r, old)
            answer = await client.post(f"/tasks/{old}/retry", headers=AUTH)
            assert (answer.status_code, answer.json()["code"]) == (409, "retry_unavailable")
            assert "RETRY_KEEP_SECONDS=0" in answer.json()["msg"]

    run(main())


def test_a_full_queue_refuses_the_retry_with_429(config: Settings) -> None:
    small = config.model_copy(update={"max_queue_depth": 1})

    async def main() -> None:
        async with api(small) as (client, r):
            old = await submit(client, r)
            await fail(r, old)
            await submit(client, r)  # the class is full again
            answer = await client.post(f"/tasks/{old}/retry", headers=AUTH)
            assert (answer.status_code, answer.json()["code"]) == (429, "queue_full")
            assert answer.headers["retry-after"]
            assert await r.hget(task_key(old), "retried_as") is None
            assert await r.get(DEFAULT_DEPTH) == "1"

    run(main())


# --- what the endings keep, and for how long ---------------------------------------------------


def test_endings_keep_payload_and_message_copy_only_for_retryable_ones(config: Settings) -> None:
    """Two tasks in one message (one task_submit call, as a group commit writes them): its copy
    stays while the one that failed may be retried, and expires within RETRY_KEEP_SECONDS; a
    message whose tasks all succeeded goes at once, payloads and copy."""

    async def main() -> None:
        async with aioredis.Redis.from_url(config.redis_url, decode_responses=True) as r:
            await write_message(r, ["a", "b"])
            await write_message(r, ["c"])
            await fail(r, "a")
            await succeed(r, "b")
            await succeed(r, "c")
            assert [await raw_payload(config, t) for t in "bc"] == [None, None]
            assert await raw_payload(config, "a") == BIG
            assert 0 < await r.ttl(payload_key("a")) <= KEEP
            assert await r.exists(message_key("c")) == 0
            assert await r.hget(message_key("a"), "open") == "0"
            assert 0 < await r.ttl(message_key("a")) <= KEEP
            assert message_call(await r.hget(message_key("a"), "body") or "", "a") is not None

    run(main())


async def write_message(
    r: aioredis.Redis, task_ids: list[str], credentials: frozenset[str] = frozenset()
) -> None:
    """One task_submit call of `task_ids` in one message, each with a claim-checked payload
    and retry_keep, as api/store.py writes them; those in `credentials` carry a token."""
    now, queue = _now(), queue_of(Priority.default)
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
            NewTask(**{**_fields_of(new), "credentials": t in credentials}).fields(now, "o"),
            payload=BIG,
        )
        for t in task_ids
    ]
    message = encode_message(entries, queue=queue)
    results = await SubmitTasks(r)(
        tasks, {queue: message}, max_depth=100, ttl=600, idempotency_ttl=600
    )
    assert results == [1] * len(task_ids)


def _fields_of(new: NewTask) -> dict[str, Any]:
    return {name: getattr(new, name) for name in NewTask.__dataclass_fields__}


# --- per-request credentials never outlive their task ----------------------------------------


def test_a_task_with_credentials_keeps_nothing_and_its_retry_is_a_clear_409(
    config: Settings,
) -> None:
    async def main() -> None:
        async with api(config) as (client, r):
            headers = {**AUTH, "Prefer": "respond-async"}
            body = {"model_name": "echo", "token": TOKEN}
            answer = await client.post("/dispatch_model", json=body, headers=headers)
            old = answer.json()["task_id"]
            record = await r.hgetall(task_key(old))
            assert record["credentials"] == "1"
            assert "retry_keep" not in record
            copy = message_key(record["message"])
            assert await r.hget(copy, "secret") == "1"
            await fail(r, old)
            assert await r.exists(copy) == 0  # the token went with its task
            answer = await client.post(f"/tasks/{old}/retry", headers=AUTH)
            assert answer.status_code == 409, answer.text
            assert answer.json()["code"] == "retry_unavailable"
            assert "credentials" in answer.json()["msg"]
            assert TOKEN not in answer.text

    run(main())


def test_a_message_carrying_credentials_is_never_kept_for_its_other_tasks(
    config: Settings,
) -> None:
    """One message, a task with a token and one without: the one without fails and would keep
    the copy for its retry, but the copy holds the other's token, so it goes at once."""

    async def main() -> None:
        async with aioredis.Redis.from_url(config.redis_url, decode_responses=True) as r:
            await write_message(r, ["s", "p"], credentials=frozenset("s"))
            assert await r.hget(message_key("s"), "secret") == "1"
            assert await r.hget(task_key("p"), "retry_keep") == str(KEEP)
            await fail(r, "p")
            assert await r.hget(message_key("s"), "open") == "1"  # "s" still needs it
            await fail(r, "s")
            assert await r.exists(message_key("s")) == 0
            assert await raw_payload(config, "s") is None  # no retry_keep: deleted
            assert 0 < await r.ttl(payload_key("p")) <= KEEP  # its own bytes, no secret

    run(main())


def test_a_short_record_bounds_what_is_kept(config: Settings) -> None:
    async def main() -> None:
        async with api(config) as (client, r):
            old = await submit_bytes(client, r)
            await StartTasks(r)([old], TERMS, now=_now())
            outcome = Outcome.failed(old, ModelNotFound("no model"))
            await FinishTasks(r)([outcome], now=_now(), ttl=30)  # RESULT_TTL below the keep
            assert 0 < await r.ttl(payload_key(old)) <= 30
            assert 0 < await r.ttl(message_key(old)) <= 30

    run(main())


def test_a_plain_submit_is_kept_for_retry(config: Settings) -> None:
    async def main() -> None:
        async with api(config) as (client, r):
            headers = {**AUTH, "Prefer": "respond-async"}
            body = {"model_name": "echo"}
            answer = await client.post("/dispatch_model", json=body, headers=headers)
            old = answer.json()["task_id"]
            await fail(r, old)
            answer = await client.post(f"/tasks/{old}/retry", headers=AUTH)
            assert answer.status_code == 202, answer.text

    run(main())
