"""Tasks and batches written through the real scripts, for the scripts' tests."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis

from shared.errors import DeadlineExceeded, TaskCanceled, TaskExpired
from shared.priorities import Priority, queue_of
from shared.redis_state.batch import NewBatch, item_task_id
from shared.redis_state.batch_scripts import AddBatchItems, BatchItemRecord, CreateBatch
from shared.redis_state.published import parse_published
from shared.redis_state.record import NewTask, Outcome
from shared.redis_state.task_scripts import (
    FinishTasks,
    StartTasks,
    StartTerms,
    SubmitTask,
    SubmitTasks,
)

Published = Callable[[], list[str]]
RunAsync = Callable[[Callable[[aioredis.Redis], Awaitable[Any]]], Any]

TTL = 600
IDEMPOTENCY_TTL = 900
MAX_DEPTH = 100
EXPIRED = TaskExpired("expired").body().model_dump_json()
OVERRAN = DeadlineExceeded("overran").body().model_dump_json()
CANCELED = TaskCanceled("canceled").body().model_dump_json()


def new_task(
    *,
    deadline_in: float = 60.0,
    priority: Priority = Priority.default,
    webhook: str | None = None,
    events: Sequence[str] = (),
    stream: bool = False,
) -> NewTask:
    return NewTask(
        model_name="echo",
        model_version=None,
        origin="http://torchserve:8080",
        deadline=time.time() + deadline_in,
        priority=priority,
        webhook=webhook,
        webhook_events=tuple(events),
        stream=stream,
    )


def submit_task(
    task_id: str,
    *,
    owner: str = "alice",
    payload: bytes | None = None,
    idempotency: tuple[str, str] = ("", ""),
    **task: Any,
) -> SubmitTask:
    new = new_task(**task)
    return SubmitTask(
        task_id=task_id,
        queue=queue_of(new.priority),
        fields=new.fields(time.time(), owner),
        payload=payload,
        idempotency_key=idempotency[0],
        idempotency_record=idempotency[1],
    )


def submit(run_async: RunAsync, *tasks: SubmitTask, max_depth: int = MAX_DEPTH) -> list[int | str]:
    """One task_submit call; each queue's message is a JSON list of its task ids."""
    messages: dict[str, list[str]] = {}
    for task in tasks:
        messages.setdefault(task.queue, []).append(task.task_id)

    async def call(client: aioredis.Redis) -> list[int | str]:
        encoded = {queue: json.dumps(ids) for queue, ids in messages.items()}
        return await SubmitTasks(client)(
            tasks, encoded, max_depth=max_depth, ttl=TTL, idempotency_ttl=IDEMPOTENCY_TTL
        )

    result: list[int | str] = run_async(call)
    return result


def start(
    r: redis.Redis, *task_ids: str, max_deliveries: int = 3, now: float | None = None
) -> list[tuple[str, int]]:
    terms = StartTerms(max_deliveries, TTL, "w1@host", EXPIRED, OVERRAN)
    at = time.time() if now is None else now
    return _on_loop(r, lambda client: StartTasks(client)(task_ids, terms, at))


def finish(r: redis.Redis, *outcomes: Outcome) -> list[bool]:
    return _on_loop(r, lambda client: FinishTasks(client)(outcomes, now=time.time(), ttl=TTL))


def _on_loop(r: redis.Redis, call: Callable[[aioredis.Redis], Awaitable[Any]]) -> Any:
    """A worker's script call (asyncio) from a sync test, on the same server as `r`."""

    async def run() -> Any:
        kwargs = r.connection_pool.connection_kwargs
        server = {key: kwargs[key] for key in ("host", "port", "db") if key in kwargs}
        async with aioredis.Redis(**server) as client:
            return await call(client)

    return asyncio.run(run())


def create_batch(
    run_async: RunAsync,
    batch_id: str,
    items: Sequence[NewTask],
    *,
    owner: str = "alice",
    webhook: str | None = None,
    events: Sequence[str] = (),
    payloads: dict[int, bytes] | None = None,
    idempotency: tuple[str, str] = ("", ""),
    max_depth: int = MAX_DEPTH,
    ttl: int = 3600,
) -> list[Any]:
    """batch_create and one batch_add_items in one MULTI, one message per item; the replies."""
    now = time.time()
    per_queue: dict[str, int] = {}
    records = []
    for index, item in enumerate(items):
        queue = queue_of(item.priority)
        per_queue[queue] = per_queue.get(queue, 0) + 1
        payload = (payloads or {}).get(index)
        records.append(BatchItemRecord(index, queue, item.item_fields(), payload))
    messages = [(r.queue, item_task_id(batch_id, r.index)) for r in records]
    new = NewBatch(len(items), now, owner, TTL, webhook, tuple(events))

    async def call(client: aioredis.Redis) -> list[Any]:
        async with client.pipeline(transaction=True) as pipe:
            await CreateBatch(client)(
                pipe, batch_id, fields=new.fields(), per_queue=per_queue, ttl=ttl,
                max_depth=max_depth, idempotency_key=idempotency[0],
                idempotency_record=idempotency[1], idempotency_ttl=IDEMPOTENCY_TTL,
            )  # fmt: skip
            await AddBatchItems(client)(
                pipe, batch_id, items=records, messages=messages, ttl=TTL, now=now, owner=owner
            )
            result: list[Any] = await pipe.execute()
            return result

    replies: list[Any] = run_async(call)
    return replies


def item(custom_id: str = "item", **task: Any) -> NewTask:
    """A batch item."""
    return dataclasses.replace(new_task(**task), custom_id=custom_id)


def ids(published: Published) -> list[str]:
    """The ids of the finished channel's messages so far."""
    return [parse_published(message)[0] for message in published()]
