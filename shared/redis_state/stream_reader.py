"""The stream hub: every waiting reader of task streams in a process, on one Redis connection.

An SSE client of `GET /tasks/{id}/stream` may wait minutes for its task's chunks; a blocking
read per client would cost a connection each (and a thread, with a sync client). Instead one
hub per API process runs one loop: a blocking XREAD over the streams of all its subscribers
(each from the oldest position any of its subscribers needs, COUNT entries at most per stream,
BLOCK at most `block_ms`), handing each entry to the subscribers that have not had it. A
subscriber is a task id and a position (the client's Last-Event-ID, or the start): it gets
exactly the entries after that position, in order, then the stream's `error` or `done`, and
then its iteration ends. One that comes after the end reads the history the same way.

A new subscriber must not wait out a block: the hub's XREAD also reads a wake-up stream of its
own (keys.py HUB_WAKE_KEY_PREFIX), and a subscribe while the loop blocks XADDs to it through a
second client (the process's usual pool), which ends the block at once; a wake-up written
before the XREAD reaches Redis ends it too, so none is lost. The block timeout is only the
bound if a wake-up write fails. So the hub costs the `reader` connection plus, for the
wake-ups, one command at a time on `writer`.

Each subscriber buffers at most `buffer` events: one whose client reads slowly is left out of
the XREAD until it drains (its position stays put, so it loses nothing), rather than the hub
holding a whole stream per slow client. A subscriber that closes is dropped at the next read.

It lives in shared/redis_state beside streams.py, not in api/: it is the stream format's
reader (key names, entry fields, id order), tested against Redis alone, with nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.typing import KeyT, StreamIdT

from shared.redis_state.keys import hub_wake_key, stream_key
from shared.redis_state.loader import text
from shared.redis_state.streams import START, StreamEvent, id_order, parse_entries, parse_event_id

log = logging.getLogger(__name__)

DEFAULT_BLOCK_MS = 2_000
DEFAULT_COUNT = 100
DEFAULT_BUFFER = 256
# The reader's socket must outlast its longest block by this much.
SOCKET_MARGIN = 1.0
# The wake-up stream outlives a hub that stopped without closing (a killed process) by this.
WAKE_TTL = 60
RECONNECT_SECONDS = (0.05, 2.0)  # first and longest pause after a failed XREAD
CANCEL_RETRY_SECONDS = 0.1


class Subscription:
    """One reader of one task's stream: `async for event in subscription`, or `await next()`.

    The iteration ends after the stream's `error` or `done`, or when the subscription or its
    hub is closed (then `finished` is False: the client should reconnect with `last_id`).
    """

    def __init__(self, hub: StreamHub, task_id: str, position: str, buffer: int) -> None:
        self.task_id = task_id
        self.key = stream_key(task_id)
        self.last_id = position  # the last event handed to the consumer (or its start)
        self.finished = False  # it got the stream's error or done
        self._hub = hub
        self._buffer = buffer
        self._position = id_order(position)  # the last event queued
        self._events: deque[StreamEvent] = deque()
        self._arrived = asyncio.Event()
        self._ended = False  # nothing more will be queued (terminal queued, or closed)
        self.paused = False  # buffer full: left out of the hub's reads until it drains

    def wants(self, event: StreamEvent) -> bool:
        return id_order(event.id) > self._position

    @property
    def position(self) -> tuple[int, int]:
        return self._position

    @property
    def ended(self) -> bool:
        """Nothing more will be queued: its error or done is, or it was closed."""
        return self._ended

    @property
    def active(self) -> bool:
        """Whether the hub's reads should include it now."""
        return not self._ended and not self.paused

    def push(self, event: StreamEvent) -> bool:
        """Queues `event` (the hub); False once it takes no more (full: paused; or ended)."""
        self._events.append(event)
        self._position = id_order(event.id)
        self._arrived.set()
        if event.terminal:
            self._ended = True
        elif len(self._events) >= self._buffer:
            self.paused = True
        return self.active

    def end(self) -> None:
        """Nothing more will come (the hub closes, or the consumer closed it)."""
        self._ended = True
        self._arrived.set()

    async def next(self) -> StreamEvent:
        """The next event; StopAsyncIteration when there is none left. Safe to cancel (e.g.
        by `asyncio.timeout`, to send a keep-alive): an event is taken only when returned."""
        while not self._events:
            if self._ended:
                raise StopAsyncIteration
            self._arrived.clear()
            await self._arrived.wait()
        event = self._events.popleft()
        self.last_id = event.id
        if event.terminal:
            self.finished = True
        if self.paused and len(self._events) <= self._buffer // 2:
            self.paused = False
            self._hub.wake()
        return event

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamEvent:
        return await self.next()

    def close(self) -> None:
        """The client went away: the hub stops reading for it."""
        self.end()
        self._hub.drop(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class StreamHub:
    """Reads every subscribed task stream of a process with one blocking XREAD loop.

    `reader`: a client for the loop alone (it runs one command at a time, so it holds one
    connection), RESP2, whose socket timeout exceeds `block_ms` (else the block would time out
    as an error). `writer`: any client (the process's pool), for the wake-ups.
    """

    def __init__(
        self,
        reader: aioredis.Redis,
        writer: aioredis.Redis,
        *,
        block_ms: int = DEFAULT_BLOCK_MS,
        count: int = DEFAULT_COUNT,
        buffer: int = DEFAULT_BUFFER,
        hub_id: str | None = None,
    ) -> None:
        if block_ms < 1 or count < 1 or buffer < 2:
            raise ValueError("block_ms and count must be at least 1, buffer at least 2")
        options = reader.connection_pool.connection_kwargs
        if options.get("protocol") not in (None, 2, "2"):
            raise ValueError("the hub's reader must speak RESP2 (the XREAD reply it parses)")
        timeout = options.get("socket_timeout")
        if timeout is not None and timeout < block_ms / 1000 + SOCKET_MARGIN:
            raise ValueError(
                f"the hub's reader needs a socket timeout of at least block_ms + "
                f"{SOCKET_MARGIN:g} s, not {timeout} s"
            )
        self._reader, self._writer = reader, writer
        self._block_ms, self._count, self._buffer = block_ms, count, buffer
        self._subscribers: dict[str, set[Subscription]] = {}
        self._wake_key = hub_wake_key(hub_id or uuid.uuid4().hex)
        self._wake_seen = START
        self._reading = False  # the loop is in (or about to send) its XREAD
        self._wake_sent = False  # a wake-up was written since that XREAD was built
        self._pending: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._closed = False
        self.reads = 0  # XREADs answered (for tests and metrics)

    @property
    def subscribers(self) -> int:
        return sum(len(subscribers) for subscribers in self._subscribers.values())

    @property
    def streams(self) -> int:
        """Streams the hub reads (tasks with an active subscriber)."""
        return len(self._subscribers)

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.create_task(self._run(), name="stream-hub")

    async def close(self) -> None:
        """Stops the loop, ends every subscription (not `finished`) and deletes the wake key."""
        self._closed = True
        for task in [task for task in (self._loop, *self._pending) if task is not None]:
            while not task.done():
                # Again until it ends: redis-py can absorb a cancel that lands while a command
                # is being set up. A cancel of close() itself still raises out of the wait.
                task.cancel()
                await asyncio.wait({task}, timeout=CANCEL_RETRY_SECONDS)
        for subscribers in self._subscribers.values():
            for subscription in subscribers:
                subscription.end()
        self._subscribers.clear()
        with contextlib.suppress(RedisError, OSError):
            await self._writer.delete(self._wake_key)

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def subscribe(self, task_id: str, last_id: str | None = None) -> Subscription:
        """The events of `task_id`'s stream after `last_id` (a client's Last-Event-ID, checked:
        ValueError otherwise; None: from the first), then its ending."""
        if self._closed:
            raise RuntimeError("the stream hub is closed")
        position = START if last_id is None else parse_event_id(last_id)
        subscription = Subscription(self, task_id, position, self._buffer)
        self._subscribers.setdefault(subscription.key, set()).add(subscription)
        self.wake()
        return subscription

    def drop(self, subscription: Subscription) -> None:
        """Forgets `subscription`; its stream is read no more once it has no subscriber (no
        wake-up: a read in flight merely returns entries nobody takes)."""
        subscribers = self._subscribers.get(subscription.key)
        if subscribers is None:
            return
        subscribers.discard(subscription)
        if not subscribers:
            del self._subscribers[subscription.key]

    def wake(self) -> None:
        """Ends the loop's block, so it reads what changed (at most one write per block)."""
        if not self._reading or self._wake_sent or self._closed:
            return  # the next XREAD is built from the subscribers as they are then
        self._wake_sent = True
        task = asyncio.create_task(self._send_wake())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send_wake(self) -> None:
        try:
            async with self._writer.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"wake": "1"}, maxlen=1, approximate=False)
                pipe.expire(self._wake_key, WAKE_TTL)
                await pipe.execute()
        except (RedisError, OSError) as error:
            # The block ends by itself within block_ms: late, not lost.
            log.warning("stream hub wake-up failed (%s)", type(error).__name__)

    def _positions(self) -> dict[KeyT, StreamIdT]:
        """What the next XREAD reads: each stream from its furthest-behind active subscriber."""
        streams: dict[KeyT, StreamIdT] = {}
        for key, subscribers in self._subscribers.items():
            positions = [s.position for s in subscribers if s.active]
            if positions:
                ms, seq = min(positions)
                streams[key] = f"{ms}-{seq}"
        streams[self._wake_key] = self._wake_seen
        return streams

    async def _run(self) -> None:
        pause = RECONNECT_SECONDS[0]
        while not self._closed:
            streams = self._positions()
            self._reading, self._wake_sent = True, False
            try:
                reply = await self._reader.xread(streams, count=self._count, block=self._block_ms)
            except (RedisError, OSError) as error:
                if self._closed:
                    return  # redis-py may turn the cancel of a read into a connection error
                log.warning("stream hub lost Redis (%s); retrying", type(error).__name__)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RECONNECT_SECONDS[1])
                continue
            finally:
                self._reading = False
            pause = RECONNECT_SECONDS[0]
            self.reads += 1
            self._dispatch(cast(Sequence[Any], reply or []))

    def _dispatch(self, reply: Sequence[Any]) -> None:
        for raw_key, entries in reply:
            key = text(raw_key)
            if key == self._wake_key:
                self._wake_seen = text(entries[-1][0])
                continue
            subscribers = self._subscribers.get(key)
            if subscribers:
                self._deliver(key, subscribers, parse_entries(entries))

    def _deliver(self, key: str, subscribers: set[Subscription], events: list[StreamEvent]) -> None:
        for subscription in list(subscribers):
            if not subscription.active:
                continue
            for event in events:
                if subscription.wants(event) and not subscription.push(event):
                    break  # paused (read again from its position once it drains), or ended
            if subscription.ended:  # its error or done is queued: nothing more to read
                subscribers.discard(subscription)
        if not subscribers:
            del self._subscribers[key]
