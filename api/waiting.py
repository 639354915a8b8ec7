"""Waiting for results without threads: one pub/sub connection per API process for every waiter.

Workers publish a task's whole record on `FINISHED_CHANNEL` (shared/redis_state) when it ends. The
listener subscribes once, at start-up, and hands the record to the waiters registered for that
id, so a woken waiter needs no read. A waiter registers before it submits (or reads) the task,
so a task that ends in between still wakes it; it re-reads the record now and then (and after
the listener reconnects) in case a message was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.models import TaskStatus, TaskView
from shared.redis_state.keys import FINISHED_CHANNEL
from shared.redis_state.published import parse_published, published_task_id
from shared.redis_state.record import decode_record

log = logging.getLogger(__name__)

# Safety net for a lost publish: a waiter re-reads its record at least this often.
RECHECK_SECONDS = 15.0
# Pause between reconnect attempts while Redis is down.
RECONNECT_SECONDS = 0.5
# A queued task's expiry is published by no one until a worker takes it: re-read it this long
# after its deadline, when reading settles it as expired.
EXPIRY_GRACE_SECONDS = 0.05

V = TypeVar("V")
Read = Callable[[], Awaitable[V]]


class WaitObserver(Protocol):
    """Told when a request starts and stops waiting (api/metrics.py keeps the gauge)."""

    def started_waiting(self) -> None: ...

    def stopped_waiting(self) -> None: ...


def task_ended(view: TaskView) -> bool:
    return view.status.terminal


def task_recheck(view: TaskView) -> float:
    """A queued task's expiry is published by no one: re-read it just after its deadline."""
    if view.status is not TaskStatus.queued:
        return RECHECK_SECONDS
    return max(0.0, view.deadline.timestamp() - time.time()) + EXPIRY_GRACE_SECONDS


def _every_recheck(_: object) -> float:
    return RECHECK_SECONDS


@dataclass(frozen=True, slots=True)
class EndOf(Generic[V]):
    """How a long-poll knows what it waits for has ended: `ended(view)`; re-read at least every
    `recheck(view)` seconds; `decode(key, published record)` when the end is published with the
    record (no read needed), None when a publish only says to read again."""

    ended: Callable[[V], bool]
    recheck: Callable[[V], float] = _every_recheck
    decode: Callable[[str, dict[str, str]], V] | None = None


# A task: its end is published with its record.
TASK_END: EndOf[TaskView] = EndOf(task_ended, task_recheck, decode_record)


class Watch:
    """One waiter's registration: woken with the task's record, or to re-read it."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.woken = asyncio.Event()
        self.published: dict[str, str] | None = None

    def wake(self, published: dict[str, str] | None) -> None:
        if published is not None:
            self.published = published
        self.woken.set()

    async def until_ended(self, view: V, seconds: float, read: Read[V], end: EndOf[V]) -> V:
        """`view` once `end.ended`, or as it is when `seconds` have passed.

        Woken by a publish, the view is `end.decode`d from the published record when there is
        one (a task's end: no read needed), else `read` again; and re-read at least every
        `end.recheck(view)` seconds (RECHECK_SECONDS at most) in case a publish was lost.
        """
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while True:
            remaining = until - loop.time()
            if end.ended(view) or remaining <= 0:
                return view
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, RECHECK_SECONDS, end.recheck(view))):
                    await self.woken.wait()
            self.woken.clear()
            published, self.published = self.published, None
            if published is not None and end.decode is not None:
                view = end.decode(self.key, published)
            else:
                view = await read()

    async def until_terminal(
        self, view: TaskView, seconds: float, read: Read[TaskView]
    ) -> TaskView:
        """The task once it is terminal, or as it is when `seconds` have passed."""
        return await self.until_ended(view, seconds, read, TASK_END)


class ResultWaiter:
    """Routes published task records to the watches registered for them."""

    def __init__(self, client: aioredis.Redis, observer: WaitObserver | None = None) -> None:
        self._redis = client
        self._observer = observer
        self._watches: defaultdict[str, set[Watch]] = defaultdict(set)
        self._listener: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()
        self._waiting = 0  # kept, not summed: read on every submit (api/group_commit.py)

    @property
    def waiting(self) -> int:
        return self._waiting

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="result-listener")

    async def stop(self) -> None:
        if self._listener:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[Watch]:
        """Register for `task_id`'s end; enter before submitting or reading the task."""
        watch = Watch(task_id)
        self._watches[task_id].add(watch)
        self._waiting += 1
        if self._observer:
            self._observer.started_waiting()
        try:
            yield watch
        finally:
            self._waiting -= 1
            if self._observer:
                self._observer.stopped_waiting()
            watches = self._watches[task_id]
            watches.discard(watch)
            if not watches:
                del self._watches[task_id]

    async def long_poll(self, key: str, seconds: float, read: Read[V], end: EndOf[V]) -> V:
        """`read()` now (`seconds` <= 0), or once `ended` / after `seconds`, for every long-poll.

        Registered before the first read, so an end published in between still wakes it.
        """
        if seconds <= 0:
            return await read()
        async with self.watch(key) as watch:
            return await watch.until_ended(await read(), seconds, read, end)

    async def long_poll_task(self, task_id: str, seconds: float, read: Read[TaskView]) -> TaskView:
        """The task's long-poll: its end is published with its record."""
        return await self.long_poll(task_id, seconds, read, TASK_END)

    def _deliver(self, message: str) -> None:
        watches = self._watches.get(published_task_id(message))
        if not watches:
            return  # another API process's task
        _, fields = parse_published(message)  # None: a big result, read by the waiter
        for watch in watches:
            watch.wake(fields)

    def _wake_all(self) -> None:
        for watches in self._watches.values():
            for watch in watches:
                watch.wake(None)

    async def _listen(self) -> None:
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(FINISHED_CHANNEL)
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
                self._deliver(message["data"])
