"""Slots on the worker's event loop: at most N holders at once, the lowest rank served first.

The engine (worker/engine.py) bounds the calls of one process twice: in all
(`WORKER_MAX_IN_FLIGHT`) and per model of a model server (`WORKER_MAX_CALLS_PER_BACKEND`), so one
slow model cannot hold every slot. Waiters are served by their priority's rank
(shared/priorities.py), FIFO within a rank: a batch item never takes a free slot ahead of a sync
caller's task. A released slot goes straight to the next waiter, so a newcomer cannot overtake
the queue.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Slots:
    """`async with slots.hold(rank)`: one of `capacity` slots for the block. One event loop only."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = capacity
        self._order = itertools.count()
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []

    @property
    def in_use(self) -> int:
        return self.capacity - self._free

    @property
    def waiting(self) -> int:
        return sum(1 for *_, future in self._waiters if not future.done())

    @asynccontextmanager
    async def hold(self, rank: int) -> AsyncIterator[None]:
        await self.acquire(rank)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, rank: int) -> None:
        if self._free > 0 and not self.waiting:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rank, next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # handed a slot as it was canceled: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            *_, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)  # the slot passes to it without ever being free
                return
        self._free += 1
