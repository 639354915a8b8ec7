"""Waiting for results without threads: one pub/sub connection per API process for every waiter.

Workers publish a task's id on `shared.records.FINISHED_CHANNEL` when it ends. The listener
subscribes once, at start-up, and wakes the waiters registered for that id. A waiter registers
before it reads the record, so a task that ends between the read and the wait still wakes it, and
it re-reads the record now and then (and after the listener reconnects) in case a message was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import records
from shared.models import TaskStatus, TaskView

log = logging.getLogger(__name__)

# Safety net for a lost publish: a waiter re-reads its record at least this often.
RECHECK_SECONDS = 15.0
# Pause between reconnect attempts while Redis is down.
RECONNECT_SECONDS = 0.5
# A queued task's expiry is published by no one until a worker takes it: re-read it this long
# after its deadline, when reading settles it as expired.
EXPIRY_GRACE_SECONDS = 0.05


class ResultWaiter:
    """Wakes coroutines waiting on task ids when the id is published as finished."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._events: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._listener: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    @property
    def waiting(self) -> int:
        return sum(len(events) for events in self._events.values())

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="result-listener")

    async def stop(self) -> None:
        if self._listener:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    async def wait(
        self, task_id: str, seconds: float, read: Callable[[], Awaitable[TaskView]]
    ) -> TaskView:
        """`read()` once the task is terminal or `seconds` have passed, whichever is first."""
        event = asyncio.Event()
        self._events[task_id].add(event)
        try:
            loop = asyncio.get_running_loop()
            until = loop.time() + seconds
            while True:
                view = await read()
                remaining = until - loop.time()
                if view.status.terminal or remaining <= 0:
                    return view
                pause = min(remaining, RECHECK_SECONDS)
                if view.status is TaskStatus.queued:
                    until_expiry = max(0.0, view.deadline.timestamp() - time.time())
                    pause = min(pause, until_expiry + EXPIRY_GRACE_SECONDS)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), pause)
                event.clear()
        finally:
            events = self._events[task_id]
            events.discard(event)
            if not events:
                del self._events[task_id]

    def _wake(self, task_id: str) -> None:
        for event in self._events.get(task_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for events in self._events.values():
            for event in events:
                event.set()

    async def _listen(self) -> None:
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(records.FINISHED_CHANNEL)
                    self.subscribed.set()
                    self._wake_all()  # anything published while we were away
                    await self._dispatch(pubsub)
            except (RedisError, OSError) as error:
                self.subscribed.clear()
                log.warning("result listener lost Redis (%s); reconnecting", type(error).__name__)
                await asyncio.sleep(RECONNECT_SECONDS)

    async def _dispatch(self, pubsub: aioredis.client.PubSub) -> None:
        while True:
            message = await pubsub.get_message(timeout=RECHECK_SECONDS)
            if message and message["type"] == "message":
                self._wake(message["data"])
