"""`GET /tasks/{task_id}/stream`: a task's stream as Server-Sent Events, resumable (issue 18).

The events are the entries of the task's Redis Stream (shared/redis_state/streams.py), each
with its stream id as `id:`, read through the process's one StreamHub (no connection, no
thread per client): `output` chunks, `restart` marks, then `error` or `done`, after which the
response ends. `Last-Event-ID` (what a browser's EventSource sends when it reconnects by itself)
or `?last_event_id=` resumes exactly after that event; the header wins over the query, since
a browser keeps the first URL but sends the newest id. A client that comes after the end reads
the whole history the same way.

A streamed task's stream ends in the same step as its record (lib.lua end_stream): `error`
with its error body, or `done` with no data, for which the task view is read from the record
and sent. Two endings a plain reader of the stream would never see, answered here:
- An EventSource reconnects whenever a response ends, `done` or not. One whose Last-Event-ID is
  already the stream's `error` or `done` gets 204, which tells it to stop (WHATWG HTML).
- A task that ended with no stream at all: one that never ran (canceled while queued, expired)
  or was not streamed. Its end (from the finished channel, api/waiting.py) gives one event from
  its record, `error` for a failed or expired task, `done` (the task view) otherwise, with the id
  `SYNTHETIC_ID`; a reconnect with it gets the 204. The hub may read a streamed task's ending a
  moment after the finished channel told its end, so within `END_GRACE_SECONDS` of the end the
  stream's own ending is waited for first.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse

from api import sse
from api.deps import HubDep, OwnerDep, ResourceId, StoreDep, WaiterDep
from api.openapi import ERROR_RESPONSES
from api.store import ApiStore
from api.waiting import ResultWaiter
from shared.errors import InvalidRequest
from shared.models import TaskStatus, TaskView
from shared.redis_state.stream_reader import StreamHub, Subscription
from shared.redis_state.streams import (
    EVENT_ID_PATTERN,
    StreamEvent,
    StreamKind,
    id_order,
    parse_event_id,
    read_last,
)

router = APIRouter(prefix="/tasks", tags=["tasks"])

# The id of the one event of a task that ended without a stream: below every id Redis gives
# (those start with the time in ms), so resuming after it would still read a real stream.
SYNTHETIC_ID = "0-1"
END_GRACE_SECONDS = 1.0
EVENT_ID_MAX = 39  # two 19-digit numbers and the dash

STREAM_DESCRIPTION = (
    "Server-Sent Events, each with `id:` (its Redis stream id) and one of: `output` (a chunk "
    "as the backend produced it: JSON as it came, UTF-8 text, or a data URI), `restart` (the "
    "task runs again after its worker died; the new attempt's output follows), `error` (the "
    "task's error body; the stream ends) or `done` (the final task view; the stream ends). "
    "Comment lines keep an idle connection alive. A task that ended without a stream gets one "
    f"`error` or `done` with id `{SYNTHETIC_ID}`."
)
STREAM_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": STREAM_DESCRIPTION,
        "content": {
            sse.MEDIA_TYPE: {
                "schema": sse.EVENT_SCHEMA,
                "example": 'event: output\nid: 1764698400000-0\ndata: {"text": "Hel"}\n\n'
                'event: done\nid: 1764698400100-0\ndata: {"task_id": "...", "status": '
                '"succeeded", ...}\n\n',
            }
        },
    },
    204: {"description": "`Last-Event-ID` is already the stream's last event: nothing follows"},
    **ERROR_RESPONSES,
}
LAST_EVENT_ID_HEADER = Header(
    alias="Last-Event-ID",
    max_length=EVENT_ID_MAX,
    pattern=EVENT_ID_PATTERN,
    description="Resume after this event (an EventSource sends it when it reconnects); wins "
    "over `last_event_id`.",
)
LAST_EVENT_ID_QUERY = Query(
    max_length=EVENT_ID_MAX,
    pattern=EVENT_ID_PATTERN,
    description="Resume after this event's id (`<ms>-<seq>`).",
)


@router.get(
    "/{task_id}/stream",
    response_class=Response,
    responses=STREAM_RESPONSES,
    summary="Stream a task's output as Server-Sent Events",
)
async def stream_task(
    task_id: ResourceId,
    store: StoreDep,
    waiter: WaiterDep,
    hub: HubDep,
    owner: OwnerDep,
    last_event_id_header: Annotated[str, LAST_EVENT_ID_HEADER] = "",
    last_event_id: Annotated[str, LAST_EVENT_ID_QUERY] = "",
) -> Response:
    """The task's events from the first (or after `Last-Event-ID`) to its `error` or `done`.

    Same rules as `GET /tasks/{task_id}`: another tenant's task is a 404. Try it with
    `curl -N -H 'Accept: text/event-stream' .../tasks/{task_id}/stream`."""
    # An empty id is no id (WHATWG HTML: an EventSource sends none until it had one).
    raw = last_event_id_header.strip() or last_event_id.strip()
    try:
        last_id = parse_event_id(raw) if raw else None
    except ValueError as error:
        raise InvalidRequest(str(error)) from None
    view = await store.read_and_settle(task_id, owner)
    return await event_stream(StreamReader(hub, waiter, store, owner), view, last_id)


def wants_events(accept: str | None) -> bool:
    """Whether an `Accept` header asks for Server-Sent Events (a dispatch that waits and
    streams then answers with the stream itself)."""
    return accept is not None and sse.MEDIA_TYPE in accept.lower()


async def event_stream(reader: StreamReader, view: TaskView, last_id: str | None) -> Response:
    """The SSE response of `view`'s task after `last_id` (None: from the first); 204 when a
    reader with `last_id` has had everything. Also `POST /dispatch_model`'s answer to a
    streamed request that waits and accepts text/event-stream."""
    last = await read_last(reader.store.redis, view.task_id)
    if last_id is not None and _nothing_after(view, last, last_id):
        return Response(status_code=204)
    headers = {**sse.HEADERS, "Content-Location": f"/tasks/{view.task_id}/stream"}
    events = _events(reader, view, last, last_id)
    return StreamingResponse(events, media_type=sse.MEDIA_TYPE, headers=headers)


def _nothing_after(view: TaskView, last: StreamEvent | None, last_id: str) -> bool:
    """Whether a reader who had `last_id` has had everything the task will ever stream."""
    if last is None:  # no stream: an ended task's one event was SYNTHETIC_ID (or it expired)
        return view.status.terminal
    return last.terminal and id_order(last_id) >= id_order(last.id)


class StreamReader:
    """What one response reads from: the hub, the finished channel and the record."""

    def __init__(self, hub: StreamHub, waiter: ResultWaiter, store: ApiStore, owner: str) -> None:
        self.hub, self.waiter, self.store, self.owner = hub, waiter, store, owner

    async def read(self, task_id: str) -> TaskView:
        return await self.store.read_and_settle(task_id, self.owner)


async def _events(
    reader: StreamReader, view: TaskView, last: StreamEvent | None, last_id: str | None
) -> AsyncIterator[bytes]:
    """The response body: the stream's events with keep-alives, until its error or done."""
    task_id = view.task_id
    yield sse.retry()
    async with contextlib.AsyncExitStack() as stack:
        subscription = reader.hub.subscribe(task_id, last_id)
        stack.callback(subscription.close)
        ended: asyncio.Future[TaskView] | None = None
        if last is None:  # no stream yet: it may never come (never run, or not streamed)
            watch = await stack.enter_async_context(reader.waiter.watch(task_id))
            ended = asyncio.ensure_future(
                watch.until_terminal(view, math.inf, lambda: reader.read(task_id))
            )
        follow = _Follow(subscription, ended, lambda: reader.read(task_id))
        stack.callback(follow.close)
        while (chunk := await follow.chunk()) is not None:
            yield chunk


class _Follow:
    """One response's reading: the stream's next event and, while the task has no stream, the
    task's end; each `chunk()` is what to send next (None: nothing more)."""

    def __init__(
        self,
        subscription: Subscription,
        ended: asyncio.Future[TaskView] | None,
        read: Callable[[], Awaitable[TaskView]],
    ) -> None:
        self._subscription = subscription
        self._ended = ended
        self._read = read
        self._following = asyncio.ensure_future(subscription.next())
        self._over = False

    async def chunk(self) -> bytes | None:
        while not self._over:
            waiting: set[asyncio.Future[Any]] = {self._following}
            if self._ended is not None:
                waiting.add(self._ended)
            done, _ = await asyncio.wait(
                waiting, timeout=sse.KEEPALIVE_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                return sse.KEEPALIVE
            if self._following in done:
                return await self._event()
            assert self._ended is not None
            final, self._ended = self._ended.result(), None
            if not await _stream_ends_soon(self._following, final):
                self._over = True
                return _final_event(final)
        return None

    async def _event(self) -> bytes | None:
        try:
            event = self._following.result()
        except StopAsyncIteration:
            self._over = True  # the hub closed (the API stops): the client reconnects
            return None
        if event.terminal:
            self._over = True
            if event.kind is StreamKind.done and not event.data:
                # lib.lua end_stream leaves the final view to the API: the record it ended.
                view = await self._read()
                return sse.encode(event.kind.value, view.model_dump_json(), event.id)
        else:
            if self._ended is not None:  # the stream exists: its writer ends it
                self._ended.cancel()
                self._ended = None
            self._following = asyncio.ensure_future(self._subscription.next())
        return sse.encode_event(event)

    def close(self) -> None:
        self._following.cancel()
        if self._ended is not None:
            self._ended.cancel()


async def _stream_ends_soon(following: asyncio.Future[StreamEvent], final: TaskView) -> bool:
    """Whether the stream's first event comes within END_GRACE_SECONDS of the task's end."""
    finished = final.finished_at.timestamp() if final.finished_at else time.time()
    grace = finished + END_GRACE_SECONDS - time.time()
    if grace > 0:
        await asyncio.wait({following}, timeout=grace)
    return following.done() and following.exception() is None


def _final_event(view: TaskView) -> bytes:
    """The one event of a task that ended without a stream."""
    if view.status in (TaskStatus.failed, TaskStatus.expired) and view.error is not None:
        return sse.encode("error", view.error.model_dump_json(exclude_none=True), SYNTHETIC_ID)
    return sse.encode("done", view.model_dump_json(), SYNTHETIC_ID)
