"""An SSE reader over httpx for the streaming tests: every event with the time it reached us.

The streaming e2e tests (tests/e2e/test_streaming*.py) measure when each event reaches a
client and compare what several connections saw, so this reader parses the body as it arrives
(WHATWG framing: `event:`, `id:`, `data:` lines joined with "\\n", comments, `retry:`) and
stamps each event with `time.time()` when the bytes that complete it came in: the clock the
test model stamps its pieces with (`t`), on the same machine. A reader can stop after N events
and close its connection (a client that goes away mid-stream), and resume with `Last-Event-ID`
(or `?last_event_id=`) where it left off.

It is deliberately not the product's client (client/dispatcher_client/_sse.py): a test of the
service should not read it through the code it checks.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

EVENT_STREAM = "text/event-stream"
_LINE = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class Event:
    """One event as a client dispatches it, and `arrived`: time.time() when it was complete."""

    kind: str
    id: str
    data: str
    arrived: float

    def json(self) -> Any:
        return json.loads(self.data)

    @property
    def final(self) -> bool:
        return self.kind in ("done", "error")


class _Parser:
    """Incremental SSE parsing: `feed(bytes)` returns the events those bytes complete."""

    def __init__(self) -> None:
        self._buffer = b""
        self._kind = ""
        self._id = ""
        self._data: list[str] = []
        self.retry: int | None = None
        self.comments = 0

    def feed(self, data: bytes, now: float) -> list[Event]:
        self._buffer += data
        events: list[Event] = []
        while True:
            match = _LINE.search(self._buffer)
            # A lone CR at the end may be the first half of a CRLF: wait for the next byte.
            if match is None or (match.group() == b"\r" and match.end() == len(self._buffer)):
                return events
            line = self._buffer[: match.start()].decode("utf-8")
            self._buffer = self._buffer[match.end() :]
            if line:
                self._field(line)
            elif self._data or self._kind:
                events.append(Event(self._kind or "message", self._id, "\n".join(self._data), now))
                self._kind, self._data = "", []

    def _field(self, line: str) -> None:
        if line.startswith(":"):
            self.comments += 1
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._kind = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            self._id = value  # the last event id persists until the next one (WHATWG)
        elif name == "retry" and value.isdigit():
            self.retry = int(value)


@dataclass
class Reading:
    """One connection's answer: its status and headers, the events it brought, how it ended."""

    status: int
    headers: httpx.Headers
    events: list[Event] = field(default_factory=list)
    retry: int | None = None
    comments: int = 0
    dropped: bool = False  # we closed it before the server ended the body
    opened: float = 0.0  # time.time() when the response's headers came in

    @property
    def ids(self) -> list[str]:
        return [event.id for event in self.events]

    @property
    def outputs(self) -> list[Event]:
        return [event for event in self.events if event.kind == "output"]


class EventReader:
    """The events of one open response, as they arrive: iterate it; `reading` keeps them all."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._parser = _Parser()
        self.reading = Reading(response.status_code, response.headers, opened=time.time())

    def __iter__(self) -> Iterator[Event]:
        if self.reading.status != 200:
            return
        for piece in self._response.iter_raw():
            now = time.time()
            events = self._parser.feed(piece, now)
            self.reading.retry = self._parser.retry
            self.reading.comments = self._parser.comments
            for event in events:
                self.reading.events.append(event)
                yield event


def resume_headers(last_event_id: str | None) -> dict[str, str]:
    headers = {"Accept": EVENT_STREAM}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return headers


@contextmanager
def open_events(
    http: httpx.Client,
    url: str,
    *,
    last_event_id: str | None = None,
    params: Mapping[str, str] | None = None,
    method: str = "GET",
    json_body: Any = None,
    headers: Mapping[str, str] | None = None,
) -> Iterator[EventReader]:
    """An open SSE response of `url` (GET, or e.g. a POST whose answer is the stream); closing
    the context closes the connection, whether or not the body was read to its end."""
    sent = {**resume_headers(last_event_id), **(headers or {})}
    with http.stream(method, url, params=params, json=json_body, headers=sent) as response:
        if response.status_code != 200:
            response.read()
        yield EventReader(response)


def read_events(
    http: httpx.Client,
    url: str,
    *,
    drop_after: int | None = None,
    on_event: Callable[[Event], None] | None = None,
    **open_args: Any,
) -> Reading:
    """Read `url`'s events until the server ends the body (or the final event), or until
    `drop_after` events came: then the connection is closed by us (`dropped`). `on_event` runs
    on each event as it arrives, on this thread (the next ones wait in the socket)."""
    with open_events(http, url, **open_args) as reader:
        for event in reader:
            if on_event is not None:
                on_event(event)
            if drop_after is not None and len(reader.reading.events) >= drop_after:
                reader.reading.dropped = not event.final
                break
        return reader.reading


def event_ms(event_id: str) -> float:
    """The Redis time (s) an event id `<ms>-<seq>` was appended at."""
    return int(event_id.split("-")[0]) / 1000
