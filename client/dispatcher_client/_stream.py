"""A task's event stream (`GET /tasks/{id}/stream`) without I/O: its events, and when and how to
reconnect. `Dispatcher.stream` and `AsyncDispatcher.stream` only move bytes and sleep.

Resuming is what EventSource does: every event has an `id:`, the client remembers the last one
and sends it back as `Last-Event-ID` after a dropped connection, a read that timed out (the
service sends a keep-alive comment at least every 15 s, so silence means the connection is
gone), a stream that ended before its `done`/`error`, or a 429/5xx; the service answers with
exactly the events after it. As a second guard, an event whose id is not after the last one seen
(ids are Redis stream ids, `<ms>-<seq>`, which only grow) is dropped, so a replay by a proxy or a
server bug is never yielded twice.

Reconnecting is bounded by the client's RetryPolicy, counted from the last event received:
`max_attempts` connections in a row that bring no event, or `max_elapsed` seconds without one,
end the stream with the last failure. A stream that keeps making progress reconnects as often
as it needs to.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from ._errors import (
    DispatcherError,
    TransportError,
    UnexpectedResponse,
    error_from_body,
    error_from_response,
)
from ._flows import _failure, task_path
from ._models import TaskInfo
from ._retry import RetryPolicy, retry_after, retryable_transport_error
from ._sse import SSEEvent, SSEParser
from ._wire import Call, check

EVENT_STREAM = "text/event-stream"
FINAL_KINDS = frozenset({"done", "error"})
# Added to the client's read timeout on a stream: the service's keep-alives come every 15 s at
# the latest, so a read timeout shorter than that would drop healthy, idle streams.
KEEPALIVE_GRACE = 30.0
_STREAM_ID = re.compile(r"\A(\d{1,20})-(\d{1,20})\Z")


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One event of a task's stream.

    `kind`: `output` (a chunk as the model produced it), `restart` (the task's worker died and it
    runs again from the start: `attempt` is the new attempt's number and what follows is its
    output, so discard what the earlier attempt produced), `error` (the task failed: `error` is
    the exception, not raised unless asked), `done` (the task ended: `task` is its final view,
    whose `prediction_value` is the assembled answer); other kinds a newer service may send are
    passed through. `data` is the event's data parsed as JSON (the text itself if it is not
    JSON); `id` its event id, what `last_event_id=` takes to resume elsewhere.
    """

    kind: str
    id: str
    data: Any
    attempt: int | None = None
    task: TaskInfo | None = None
    error: DispatcherError | None = None
    raw: str = field(default="", repr=False, compare=False)

    @property
    def final(self) -> bool:
        """`done` or `error`: nothing comes after it."""
        return self.kind in FINAL_KINDS

    def raise_for_error(self) -> None:
        """Raise the task's error for an `error` event, and for a `done` whose task did not
        succeed (canceled, expired) the exception `Task.result()` would raise; else nothing."""
        if self.error is not None:
            raise self.error
        if self.task is not None and self.task.status != "succeeded":
            raise _failure(self.task)

    @classmethod
    def from_sse(cls, event: SSEEvent, task_id: str) -> StreamEvent:
        try:
            data: Any = json.loads(event.data)
        except ValueError:
            data = event.data
        kind = event.event
        if kind == "restart":
            attempt = data.get("attempt") if isinstance(data, Mapping) else None
            number = attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None
            return cls(kind, event.id, data, attempt=number, raw=event.data)
        if kind == "done":
            return cls(kind, event.id, data, task=TaskInfo.from_json(data), raw=event.data)
        if kind == "error":
            if not isinstance(data, Mapping):
                raise UnexpectedResponse(
                    "a stream error event is not an error body", code="unexpected_response"
                )
            error = error_from_body({"task_id": task_id, **data}, 0)
            return cls(kind, event.id, data, error=error, raw=event.data)
        return cls(kind, event.id, data, raw=event.data)


def _order(event_id: str) -> tuple[int, int] | None:
    match = _STREAM_ID.match(event_id)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


class StreamSession:
    """One task's stream across its connections: what to send, what came, whether to go on.

    The drivers loop: send `call()`; pass the response to `opened()` (a delay means "close it,
    sleep, reconnect"; it raises for an answer that retrying cannot fix); pass each chunk of the
    body to `feed()` and yield its events, until `finished`; when the body ends, sleep `ended()`
    (None: the stream is over), when the connection fails `dropped(error)`, and reconnect.
    `last_event_id` is where it resumes.
    """

    def __init__(self, task_id: str, policy: RetryPolicy, last_event_id: str | None = None) -> None:
        self.task_id = task_id
        self.policy = policy
        self.last_event_id = last_event_id or ""
        self.finished = False
        self.connections = 0  # how many times the stream was requested, for tests and logs
        self._parser = SSEParser()
        self._failures = 0  # connections in a row that brought no event
        self._progress_at: float | None = None  # the last event's time (or the first call's)
        self._server_retry: float | None = None  # the stream's `retry:` field, in seconds

    def call(self) -> Call:
        if self._progress_at is None:
            self._progress_at = time.monotonic()
        headers = {"Accept": EVENT_STREAM, "Cache-Control": "no-cache"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        path = f"{task_path(self.task_id)}/stream"
        return Call("GET", path, headers=headers, wait=KEEPALIVE_GRACE, stream=True)

    def opened(self, response: httpx.Response) -> float | None:
        """None: read this response's body. A delay: a 429 or 5xx to retry after it (the
        driver has read the body). Raises the error of any other failure, and for a success
        that is not an event stream."""
        self.connections += 1
        self._parser = SSEParser()  # a half-received event of the last connection is gone
        status = response.status_code
        if status == 429 or status >= 500:
            delay = retry_after(response)
            return self._retry(error_from_response(response, delay), delay)
        check(response)
        if status == 204:  # the Last-Event-ID sent was the final event already: nothing follows
            self.finished = True
            return None
        media = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        if status != 200 or media != EVENT_STREAM:
            raise UnexpectedResponse(
                f"GET {response.request.url.path}: HTTP {status} {media or 'without a type'}, "
                "not an event stream",
                status=status,
                code="unexpected_response",
            )
        return None

    def feed(self, chunk: bytes) -> list[StreamEvent]:
        """The new events `chunk` completes; none after the final one, none seen before."""
        if self.finished:
            return []
        events: list[StreamEvent] = []
        parsed = self._parser.feed(chunk)
        if self._parser.retry is not None:  # also set by a `retry:` block without data
            self._server_retry = self._parser.retry / 1000
        for sse in parsed:
            if self._seen(sse.id):
                continue
            event = StreamEvent.from_sse(sse, self.task_id)
            if event.id:
                self.last_event_id = event.id
            self._failures = 0
            self._progress_at = time.monotonic()
            events.append(event)
            if event.final:
                self.finished = True
                break
        return events

    def ended(self) -> float | None:
        """A response's body ended: None if the stream is over, else the delay before
        reconnecting (a stream cut before its `done`/`error`)."""
        return None if self.finished else self.dropped(None)

    def dropped(self, error: httpx.TransportError | None) -> float:
        """The connection failed (`error`) or ended before the final event (None): the delay
        before reconnecting, or TransportError once the retries are used up."""
        if error is not None and not retryable_transport_error(error):
            raise _transport_error(self.task_id, error) from error
        if error is None:
            failure_: DispatcherError = TransportError(
                "the event stream ended before its done or error event",
                code="transport_error",
                task_id=self.task_id,
            )
        else:
            failure_ = _transport_error(self.task_id, error)
        return self._retry(failure_, self._server_retry)

    def _retry(self, failure_: DispatcherError, asked: float | None) -> float:
        self._failures += 1
        delay = self.policy.backoff(self._failures) if asked is None else asked
        elapsed = time.monotonic() - (self._progress_at or time.monotonic()) + delay
        if self._failures >= self.policy.max_attempts or elapsed > self.policy.max_elapsed:
            raise failure_
        return delay

    def _seen(self, event_id: str) -> bool:
        new, last = _order(event_id), _order(self.last_event_id)
        return new is not None and last is not None and new <= last


def _transport_error(task_id: str, error: httpx.TransportError) -> TransportError:
    # The class names what failed; its text may quote the URL, which holds no secret.
    return TransportError(
        f"GET the task's stream: {type(error).__name__}: {error or 'no detail'}",
        code="transport_error",
        task_id=task_id,
    )
