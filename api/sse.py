"""Server-Sent Events as the WHATWG HTML standard frames them: what `GET /tasks/{id}/stream` sends.

An event is `event:`, `id:` and one `data:` line per line of its text, then a blank line; a
comment (`: ...`) is ignored by every client, which is what keeps an idle connection alive
through proxies that close silent ones (and lets the server notice a client that went away).
The data is the stream entry's text as the worker wrote it (JSON, UTF-8 text or a data URI):
a client joins the `data:` lines with "\\n", so a text with CR or CRLF line ends comes back with
LF ones; JSON, the usual case, has no raw line ends at all.
"""

from __future__ import annotations

import re

from shared.redis_state.streams import StreamEvent

MEDIA_TYPE = "text/event-stream"
# The bound is "at least every 15 s"; below it, so a slow loop still keeps it.
KEEPALIVE_SECONDS = 10.0
# How long a browser's EventSource waits before it reconnects after a dropped connection.
RETRY_MS = 2_000
HEADERS = {
    "Cache-Control": "no-cache",
    # nginx buffers proxied responses by default: an event would wait for the buffer to fill.
    "X-Accel-Buffering": "no",
}
KEEPALIVE = b": keep-alive\n\n"
# One event as the OpenAPI document describes it (before OpenAPI 3.2's `itemSchema`, a
# text/event-stream's `schema` is read as each event's: its fields as a client parses them).
EVENT_SCHEMA = {
    "type": "object",
    "required": ["event", "id", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["output", "restart", "error", "done"]},
        "id": {"type": "string", "pattern": r"^\d{1,19}-\d{1,19}$"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": 'JSON: the chunk (output), `{"attempt": n}` (restart), the error '
            "body (error) or the task view (done)",
        },
    },
}
_LINE_END = re.compile(r"\r\n|\r|\n")


def encode(kind: str, data: str, event_id: str | None = None) -> bytes:
    """One event. `kind` and `event_id` come from the stream (a StreamKind, a Redis stream id),
    never from a client, but are still refused if they hold a line end: one would start a new
    field, forging an event."""
    if _LINE_END.search(kind) or (event_id is not None and _LINE_END.search(event_id)):
        raise ValueError("an SSE event name or id cannot hold a line end")
    lines = [f"event: {kind}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.extend(f"data: {line}" for line in _LINE_END.split(data))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def encode_event(event: StreamEvent) -> bytes:
    """A stream entry as its event: its kind, its Redis stream id as `id:`, its data as is."""
    return encode(event.kind.value, event.data, event.id)


def retry(milliseconds: int = RETRY_MS) -> bytes:
    """The `retry:` field alone: how long an EventSource waits before reconnecting."""
    return f"retry: {milliseconds}\n\n".encode("ascii")


def comment(text: str) -> bytes:
    """A comment line (ignored by clients), e.g. a keep-alive."""
    if _LINE_END.search(text):
        raise ValueError("an SSE comment is one line")
    return f": {text}\n\n".encode()
