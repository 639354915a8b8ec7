"""`retry_task` / `Task.retry` of dispatcher_client against a fake service (httpx.MockTransport):
the new task's handle, a 503 retried, the 409s as `Conflict`, the links in `TaskInfo`."""

from __future__ import annotations

import asyncio

import dispatcher_client as dc
import httpx
import pytest
from dispatcher_client import AsyncDispatcher, Dispatcher, TaskInfo

from tests.support.client_fakes import BASE, FAST, TASK, Fake, error, task_body

OLD = "5f0c1a2b-0000-4000-8000-00000000000f"
RETRY = f"/tasks/{OLD}/retry"


def test_retry_task_returns_the_new_task_and_resends_after_a_503() -> None:
    fake = Fake().on(
        "POST",
        RETRY,
        error(503, "queue_unavailable"),
        httpx.Response(202, json=task_body("queued", retry_of=OLD)),
    )
    with Dispatcher(BASE, "k", retry=FAST, transport=httpx.MockTransport(fake)) as client:
        task = client.retry_task(OLD)
        again = client.task(OLD).retry()  # the same call from the old task's handle
    assert (task.task_id, again.task_id) == (TASK, TASK)
    assert len(fake.made("POST", RETRY)) == 3
    assert all(r.content == b"" for r in fake.made("POST", RETRY))


@pytest.mark.parametrize("code", ["not_retryable", "retry_unavailable"])
def test_a_task_that_cannot_be_retried_raises_conflict(code: str) -> None:
    fake = Fake().on("POST", RETRY, error(409, code, OLD))
    client = Dispatcher(BASE, retry=FAST, transport=httpx.MockTransport(fake))
    with client, pytest.raises(dc.Conflict) as raised:
        client.retry_task(OLD)
    assert (raised.value.status, raised.value.code, raised.value.task_id) == (409, code, OLD)


def test_the_async_client_retries_too() -> None:
    fake = Fake().on("POST", RETRY, httpx.Response(200, json=task_body("failed", retry_of=OLD)))

    async def main() -> tuple[str, str]:
        async with AsyncDispatcher(BASE, transport=httpx.MockTransport(fake)) as client:
            first = await client.retry_task(OLD)
            second = await client.task(OLD).retry()
            return first.task_id, second.task_id

    assert asyncio.run(main()) == (TASK, TASK)


def test_task_info_shows_both_links() -> None:
    info = TaskInfo.from_json(task_body("failed", retried_as="n", retry_of="o"))
    assert (info.retried_as, info.retry_of) == ("n", "o")
    plain = TaskInfo.from_json(task_body())
    assert (plain.retry_of, plain.retried_as) == (None, None)
