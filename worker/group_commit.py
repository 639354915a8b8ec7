"""Group commit on the worker's event loop: STARTs and outcomes of many tasks share Redis calls.

Like submits in the API (api/group_commit.py): a write goes out as soon as the loop gets to it,
carrying every item that arrived until then; items that arrive while it is in flight go
together in the next one (one task_start or task_finish call for all of them). So a lone task
waits no longer than one loop turn, and hundreds of calls ending together cost a few round trips,
not hundreds. Nothing is shared per item but the round trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Items per write: a script with this many task ids still runs in well under a millisecond, and
# Redis serves nobody else while it runs.
MAX_GROUP = 256


class GroupCommit(Generic[T, R]):
    """`await call(item)`: the item's result from one `write(items) -> results` call shared with
    every item pending at that moment. One event loop only."""

    def __init__(
        self, write: Callable[[list[T]], Awaitable[Sequence[R]]], max_group: int = MAX_GROUP
    ) -> None:
        self._write = write
        self._max_group = max_group
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def call(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_rounds(), name="group-commit")
        # Shielded: a caller canceled meanwhile does not cancel the write of the others' items.
        return await asyncio.shield(future)

    async def _write_rounds(self) -> None:
        try:
            while self._pending:
                group = self._pending[: self._max_group]
                del self._pending[: self._max_group]
                try:
                    results = await self._write([item for item, _ in group])
                except Exception as error:  # each caller gets the write's error
                    for _, future in group:
                        if not future.done():
                            future.set_exception(error)
                except BaseException:  # the loop is closing: nobody is left to answer
                    for _, future in group:
                        future.cancel()
                    raise
                else:
                    for (_, future), result in zip(group, results, strict=True):
                        if not future.done():
                            future.set_result(result)
        finally:
            self._writer = None
