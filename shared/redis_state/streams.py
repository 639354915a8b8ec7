"""A task's stream: one Redis Stream per task of what its model produced, in order, resumable.

A streamed task's worker appends each chunk as it arrives (stream_scripts.py, the script
lua/stream_append.lua), and its ending appends `error` or `done`; the API serves the entries as
Server-Sent Events, each entry's Redis stream id being the event's `id:`. So resuming after a
dropped connection is reading the entries after the client's `Last-Event-ID`: stream ids only
grow, so "after" is exact (none twice, none missing), and a client that comes after the end
reads the whole history, for as long as the stream is kept (RESULT_TTL from its last append,
like the record).

This module holds what an entry is (`StreamEvent`), how ids compare and how a client's id is
checked, and `read_after` (XRANGE from an exclusive start) for a single reader; the API's
many waiting readers share one connection through stream_reader.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

import redis.asyncio as aioredis

from shared.redis_state.keys import stream_key
from shared.redis_state.loader import text

# A stream id as Redis writes it (`<ms>-<seq>`, each a 64-bit unsigned integer).
_STREAM_ID = re.compile(r"\A(\d{1,19})-(\d{1,19})\Z")  # 19 digits: always below 2**64
# The same rule for the OpenAPI document (an empty id is no id: EventSource sends none at first).
EVENT_ID_PATTERN = r"^(\d{1,19}-\d{1,19})?$"
# The position before every entry: reading after it reads the whole stream.
START = "0-0"


class StreamKind(str, Enum):
    """What an entry is; `error` and `done` end the stream (nothing is appended after them)."""

    output = "output"  # one chunk as the backend produced it
    restart = "restart"  # a new attempt begins: the task's worker died and it runs again
    error = "error"  # the task's error body; the stream ends
    done = "done"  # the final task view; the stream ends

    @property
    def terminal(self) -> bool:
        return self in (StreamKind.error, StreamKind.done)


class EntryField(str, Enum):
    """The fields of every entry (lua/stream_append.lua writes them; all values are strings)."""

    kind = "kind"  # StreamKind
    attempt = "attempt"  # the writer's delivery of the task, from 1
    data = "data"  # the event's text
    seq = "seq"  # output entries of its attempt so far (the entry cap counts these)
    bytes = "bytes"  # their data bytes (the byte cap counts these)


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One entry of a task's stream, as readers get it."""

    id: str  # its Redis stream id: the SSE `id:`
    kind: StreamKind
    attempt: int
    data: str

    @property
    def terminal(self) -> bool:
        return self.kind.terminal


def parse_entry(entry_id: Any, fields: Mapping[Any, Any]) -> StreamEvent:
    """An entry as XRANGE or XREAD returns it (decoded to str or not)."""
    values = {text(name): text(value) for name, value in fields.items()}
    return StreamEvent(
        id=text(entry_id),
        kind=StreamKind(values[EntryField.kind.value]),
        attempt=int(values[EntryField.attempt.value]),
        data=values[EntryField.data.value],
    )


def parse_entries(entries: Sequence[Any]) -> list[StreamEvent]:
    """XRANGE's entries, or one stream's entries of an XREAD reply: (id, fields) pairs."""
    return [parse_entry(entry_id, _as_mapping(fields)) for entry_id, fields in entries]


def _as_mapping(fields: Any) -> Mapping[Any, Any]:
    """An entry's fields: redis-py gives a dict; a raw reply (a script's) a flat list."""
    if isinstance(fields, Mapping):
        return fields
    return dict(zip(fields[::2], fields[1::2], strict=True))


def id_order(entry_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair: ids compare by milliseconds, then sequence."""
    match = _STREAM_ID.match(entry_id)
    if match is None:
        raise ValueError("not a stream id")
    return int(match.group(1)), int(match.group(2))


def parse_event_id(raw: str) -> str:
    """A client's `Last-Event-ID` (or `?last_event_id=`) checked as a stream id, normalized.

    Raises ValueError (whose message does not echo the value) for anything else: a client's
    header goes into a Redis command only once it is known to be an id."""
    match = _STREAM_ID.match(raw.strip())
    if match is None:
        raise ValueError("Last-Event-ID is not an event id of this stream (<ms>-<seq>)")
    return f"{int(match.group(1))}-{int(match.group(2))}"


async def read_after(
    client: aioredis.Redis, task_id: str, last_id: str | None, *, count: int
) -> list[StreamEvent]:
    """Up to `count` events after `last_id` (exclusive; None: from the first), in order.

    One XRANGE with the exclusive start `(id` (Redis 6.2+): for a single reader, or to page
    through a long history; call again from the last event's id until fewer than `count`
    come back."""
    start = "-" if last_id is None else "(" + parse_event_id(last_id)
    entries = await client.xrange(stream_key(task_id), min=start, max="+", count=count)
    return parse_entries(cast(Sequence[Any], entries))


async def read_last(client: aioredis.Redis, task_id: str) -> StreamEvent | None:
    """The stream's last event (None: no stream). A reader whose Last-Event-ID is that event's,
    when it is `error` or `done`, has had everything: an SSE client reconnects whenever a
    stream closes, so the API answers it this way rather than waiting for more."""
    entries = await client.xrevrange(stream_key(task_id), max="+", min="-", count=1)
    events = parse_entries(cast(Sequence[Any], entries))
    return events[0] if events else None
