"""What the endings of tasks keep for a retry, and for how long: payload and message copy for a
failed, expired or canceled task, bounded by its record; nothing of a request with credentials."""

from __future__ import annotations

import redis.asyncio as aioredis

from api.retry import message_call
from shared.errors import ModelNotFound
from shared.redis_state.keys import message_key, payload_key, task_key
from shared.redis_state.record import Outcome
from shared.redis_state.task_scripts import (
    FinishTasks,
    StartTasks,
)
from shared.settings import Settings
from tests.unit.api.retry.harness import (
    AUTH,
    BIG,
    KEEP,
    TERMS,
    TOKEN,
    api,
    fail,
    raw_payload,
    run,
    submit_bytes,
    succeed,
    time_now,
    write_message,
)

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
            await StartTasks(r)([old], TERMS, now=time_now())
            outcome = Outcome.failed(old, ModelNotFound("no model"))
            await FinishTasks(r)([outcome], now=time_now(), ttl=30)  # RESULT_TTL below the keep
            assert 0 < await r.ttl(payload_key(old)) <= 30
            assert 0 < await r.ttl(message_key(old)) <= 30

    run(main())
