"""Typed calls of the batch scripts (lua/batch_*.lua): the only code that knows their arguments.

All run in the API (asyncio), queued on a pipeline: a batch is created by one MULTI of
batch_create and batch_add_items calls (it appears whole or not at all), and canceled by
batch_mark_canceling then batch_cancel_items calls in one round trip. Their replies come back
from the pipeline's `execute()`, in the order the calls were queued.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.client import Pipeline

from shared.redis_state.keys import batch_key, queued_key
from shared.redis_state.loader import AsyncWrapper, text


@dataclass(frozen=True, slots=True)
class BatchItemRecord:
    """One item of a batch_add_items call."""

    index: int
    queue: str
    fields: list[str]  # field, value, ... beyond what every item shares (record.NewTask)
    payload: bytes | bytearray | None = None  # claim-checked payload


class CreateBatch(AsyncWrapper):
    """batch_create: the depth checks per class, the batch hash and its Idempotency-Key."""

    name = "batch_create"

    async def __call__(
        self,
        pipe: Pipeline,
        batch_id: str,
        *,
        fields: Sequence[str],
        per_queue: Mapping[str, int],
        ttl: int,
        max_depth: int,
        idempotency_key: str = "",
        idempotency_record: str = "",
        idempotency_ttl: int = 0,
    ) -> None:
        """Queued on `pipe`; its reply: 1 (created), 0 (a class would exceed `max_depth`) or
        the idempotency record held under `idempotency_key` (a replay). `fields`: the batch
        hash (batch.NewBatch.fields); `per_queue`: the items of each queue."""
        key = batch_key(batch_id)
        queues = list(per_queue)
        await self._script(
            keys=[key, idempotency_key or key, *(queued_key(queue) for queue in queues)],
            args=[
                max_depth,
                idempotency_record,
                idempotency_ttl,
                ttl,
                *(per_queue[queue] for queue in queues),
                *fields,
            ],
            client=pipe,
        )


class AddBatchItems(AsyncWrapper):
    """batch_add_items: records a slice of a created batch's items, pushes their messages."""

    name = "batch_add_items"

    async def __call__(
        self,
        pipe: Pipeline,
        batch_id: str,
        *,
        items: Sequence[BatchItemRecord],
        messages: Sequence[tuple[str, str]],
        ttl: int,
        now: float,
        owner: str,
    ) -> None:
        """Queued on `pipe`; its reply: 1, or 0 when no batch was created. `messages`: (queue,
        Celery message) pairs; each message carries several of the items."""
        entries: list[list[Any]] = []
        payloads: list[bytes | bytearray] = []
        for item in items:
            if item.payload is not None:
                payloads.append(item.payload)
            number = len(payloads) if item.payload is not None else 0
            entries.append([item.index, item.queue, item.fields, number])
        await self._script(
            keys=[batch_key(batch_id)],
            args=[
                ttl,
                now,
                owner,
                batch_id,
                json.dumps(entries),
                json.dumps([queue for queue, _ in messages]),
                *(message for _, message in messages),
                *payloads,
            ],
            client=pipe,
        )


class MarkBatchCanceling(AsyncWrapper):
    """batch_mark_canceling: a live batch becomes `canceling`."""

    name = "batch_mark_canceling"

    async def __call__(self, batch_id: str, *, now: float) -> str:
        """The batch's status before the call ('' when it does not exist)."""
        return text(await self._script(keys=[batch_key(batch_id)], args=[now]))


class CancelBatchItems(AsyncWrapper):
    """batch_cancel_items: cancels the queued items of a batch in a range of indices."""

    name = "batch_cancel_items"

    async def __call__(
        self, pipe: Pipeline, batch_id: str, first: int, last: int, *, now: float, ttl: int,
        error: str,
    ) -> None:  # fmt: skip
        """Queued on `pipe`; its reply: how many were canceled. `error`: the cancel's error body
        (JSON without task_id: each item's id is put in)."""
        args: list[str | float] = [now, ttl, error, batch_id, first, last]
        await self._script(keys=[], args=args, client=pipe)
