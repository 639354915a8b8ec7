"""Typed calls of the scripts GET /status reads with (api/status.py): they write nothing."""

from __future__ import annotations

from collections.abc import Sequence

from shared.redis_state.loader import AsyncWrapper, text


class QueueOldest(AsyncWrapper):
    """queue_oldest: when the oldest message of each queue was accepted (its first task's
    created_at), None for an empty queue or a record gone."""

    name = "queue_oldest"

    async def __call__(self, queues: Sequence[str]) -> list[float | None]:
        replies = await self._script(keys=list(queues), args=[])
        return [float(text(r)) if text(r) else None for r in replies]
