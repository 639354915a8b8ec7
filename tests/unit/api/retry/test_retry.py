"""`POST /tasks/{id}/retry` through the real app (ASGI) on a real redis-server: a new task with
the same request and payload, linked both ways, and what cannot be retried (see harness.py)."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest

from shared.redis_state.keys import message_key, payload_key, task_key
from shared.settings import Settings
from tests.unit.api.retry.harness import (
    AUTH,
    BIG,
    DEFAULT_DEPTH,
    KEEP,
    OTHER,
    api,
    call_of,
    fail,
    keep_for_retry,
    queued_ids,
    raw_payload,
    run,
    submit,
    submit_bytes,
    succeed,
    time_now,
)

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
            await asyncio.sleep(deadline - time_now() + 0.01)  # past it: the next read settles it
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
