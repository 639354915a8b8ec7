"""An incremental Server-Sent Events parser: the bytes of `iter_bytes()`/`aiter_bytes()` in,
events out, split anywhere.

It follows the WHATWG HTML "event stream interpretation", so it reads `/tasks/{id}/stream` the
way a browser's EventSource would (httpx only: this package cannot use the service's own
parser, which lives in the worker):

- lines end with CRLF, LF or CR; a CR that ends one read and an LF that starts the next are one
  line end (a CR ends its line at once, so an event is never held back waiting for a byte);
- lines are split as bytes and decoded as UTF-8 (invalid bytes replaced) only once whole: CR and
  LF never occur inside a multi-byte sequence, so a read that ends mid-character is harmless;
  one leading BOM is dropped;
- `field: value` (one space after the colon dropped); a line without a colon is a field with an
  empty value; a line starting with `:` is a comment (the service's keep-alives); unknown fields
  are ignored;
- `data` lines join with `\\n`; an empty line dispatches the event unless its data is empty;
  `event` names it (`message` by default); `id` sets the last event ID, which later events carry
  too (an id containing NUL is ignored); `retry` takes ASCII digits only;
- an event without its closing empty line when the stream ends is discarded (it may be cut).

Bounded, since something between the client and the service may send a line that never ends: a
line over `max_line_bytes` or an event over `max_event_bytes` raises SSETooLarge, whose message
names the limit and never quotes the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

BOM = b"\xef\xbb\xbf"
# An LLM chunk is a few hundred bytes and a final task view a few kB; a `done` carrying a large
# prediction is the biggest event, hence the larger event bound.
MAX_LINE_BYTES = 1 << 20
MAX_EVENT_BYTES = 16 << 20


class SSETooLarge(ValueError):
    """A line or an event of the stream is over the parser's limit."""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event. `id`: the stream's last event ID when it was dispatched ("" if none
    was ever set); `retry`: the reconnection time (ms) this event's `retry` field set."""

    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None


class SSEParser:
    """`feed(chunk)` returns the events `chunk` completes, in order; `close()` at the end.

    `last_event_id` and `retry` are the stream's state as the spec keeps it (a `retry` in a block
    without data changes `retry` without dispatching anything).
    """

    def __init__(
        self, *, max_line_bytes: int = MAX_LINE_BYTES, max_event_bytes: int = MAX_EVENT_BYTES
    ) -> None:
        self.max_line_bytes = max_line_bytes
        self.max_event_bytes = max_event_bytes
        self.last_event_id = ""
        self.retry: int | None = None
        self._buffer = bytearray()  # the current line, not ended yet
        self._skip_lf = False  # the last byte seen was a CR: an LF right after it is its pair
        self._started = False  # past the place a BOM may be
        self._data: list[str] = []
        self._event_type = ""
        self._event_retry: int | None = None
        self._event_bytes = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        data = bytes(chunk)
        size = len(data)
        start = 1 if self._skip_lf and data[:1] == b"\n" else 0
        if size:
            self._skip_lf = False
        while start < size:
            end = _line_end(data, start)
            if end < 0:
                self._buffer += data[start:]
                self._check_line(len(self._buffer), self._buffer[:1])
                break
            self._check_line(len(self._buffer) + end - start, (self._buffer or data[start:])[:1])
            line = bytes(self._buffer) + data[start:end] if self._buffer else data[start:end]
            self._buffer.clear()
            start = end + 1
            if data[end] == 0x0D:  # CR: an LF right after it (here or in the next read) pairs
                if start == size:
                    self._skip_lf = True
                elif data[start] == 0x0A:
                    start += 1
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def close(self) -> None:
        """The end of one connection: a half-received event is dropped. `last_event_id` stays,
        as EventSource keeps it for the reconnection."""
        self._buffer.clear()
        self._skip_lf = False
        self._started = False
        self._reset_event()

    def _check_line(self, length: int, first: bytes | bytearray) -> None:
        """Raise for a line over the limit, or one that, not ended yet, already takes its event
        over the limit (a comment counts towards no event)."""
        if length > self.max_line_bytes:
            raise SSETooLarge(f"an event stream line is over {self.max_line_bytes} bytes")
        if first != b":":
            self._check_event(self._event_bytes + length)

    def _check_event(self, length: int) -> None:
        if length > self.max_event_bytes:
            raise SSETooLarge(f"an event stream event is over {self.max_event_bytes} bytes")

    def _line(self, raw: bytes) -> SSEEvent | None:
        if not self._started:
            self._started = True
            if raw.startswith(BOM):
                raw = raw[len(BOM) :]
        if not raw:
            return self._dispatch()
        if raw[:1] == b":":  # a comment: keep-alives
            return None
        self._event_bytes += len(raw)
        self._check_event(self._event_bytes)
        field, colon, value = raw.decode("utf-8", errors="replace").partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        self._field(field, value)
        return None

    def _field(self, field: str, value: str) -> None:
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event_type = value
        elif field == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif field == "retry" and value.isascii() and value.isdigit():
            self.retry = self._event_retry = int(value)

    def _dispatch(self) -> SSEEvent | None:
        data, event_type, retry = self._data, self._event_type, self._event_retry
        self._reset_event()
        if not data:
            return None
        return SSEEvent("\n".join(data), event_type or "message", self.last_event_id, retry)

    def _reset_event(self) -> None:
        self._data = []
        self._event_type = ""
        self._event_retry = None
        self._event_bytes = 0


def _line_end(data: bytes, start: int) -> int:
    """The index of the first CR or LF at or after `start`, or -1."""
    cr = data.find(b"\r", start)
    lf = data.find(b"\n", start)
    if cr < 0 or lf < 0:
        return max(cr, lf)
    return min(cr, lf)
