"""The one interface every protocol's streamed answer is decoded through, and what they share.

The caller (caller.py) reads a streamed 200 off the socket, under its timeouts, and drives the
protocol's decoder the same way whatever the protocol:

    decoder = Decoder(StreamContext(where, call.operation, reply.header("content-type"), redact))
    for each body read:              outputs += decoder.feed(data)
    at each HTTP/1.1 chunk's end:    outputs += decoder.chunk_end()   (and once at the body's end)
    when the body ended cleanly:     answer = decoder.end()           (a DispatchError if wrong)
    when the body was cut short:     raise cut_short(where)

Each output is one chunk as the backend produced it: parsed JSON where it is JSON, a string
where it is UTF-8 text, otherwise a data URI. `end()` is the final result, what a non-streamed
request would have returned. A decoder never reads a socket, sleeps or retries (base.py's
split): it is pure, so every protocol's decoding is tested on bytes split at every position.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared import fastjson
from shared.errors import StreamBroken
from worker.backends.base import Answer
from worker.backends.stream_sse import (
    MAX_EVENT_BYTES,
    MAX_LINE_BYTES,
    Event,
    SSEParser,
    SSETooLarge,
)


def _no_redaction(text: str) -> str:
    return text


@dataclass(frozen=True, slots=True)
class StreamContext:
    """What a decoder knows of its call: `where` names the server in messages (the client's
    `where`), `operation` the call's, `content_type` the 200's, `redact` the client's (a
    message a backend sends may echo its token). The limits bound one line and one event (or,
    for TorchServe, one chunk): a stream that never ends its line cannot exhaust the worker."""

    where: str
    operation: str = ""
    content_type: str | None = None
    redact: Callable[[str], str] = _no_redaction
    max_line_bytes: int = MAX_LINE_BYTES
    max_event_bytes: int = MAX_EVENT_BYTES


class StreamDecoder(ABC):
    """A protocol's decoding of one streamed answer; one instance per attempt."""

    def __init__(self, context: StreamContext) -> None:
        self.context = context

    @abstractmethod
    def feed(self, data: bytes) -> list[Any]:
        """The output chunks that `data` (the next bytes of the body, split anywhere)
        completes; a DispatchError when the stream says it failed or breaks its protocol."""

    def chunk_end(self) -> list[Any]:
        """The transport saw an HTTP/1.1 chunk end (or the body end): the outputs that
        completes. Only TorchServe frames its outputs so; SSE protocols frame their own."""
        return []

    @abstractmethod
    def end(self) -> Answer:
        """The final result once the body ended cleanly; StreamBroken (or the error the
        stream carried) when it ended without its protocol's end."""


def cut_short(where: str) -> StreamBroken:
    """The error of a body the connection cut before its end (the caller sees that, not the
    decoder: a chunked body without its last chunk, a closed connection)."""
    return StreamBroken(f"{where} closed the connection in the middle of a streamed answer")


def is_event_stream(content_type: str | None) -> bool:
    media = (content_type or "").partition(";")[0].strip().lower()
    return media == "text/event-stream"


class SSEStreamDecoder(StreamDecoder):
    """What the SSE protocols (OpenAI, OIP) share: events parsed, each event's data parsed as
    JSON (`[DONE]` aside, which `json_event` sees as the string), limits turned into
    StreamBroken. A subclass says what each JSON object means (`json_event`)."""

    def __init__(self, context: StreamContext) -> None:
        super().__init__(context)
        self._parser = SSEParser(
            max_line_bytes=context.max_line_bytes, max_event_bytes=context.max_event_bytes
        )
        self.events = 0

    def feed(self, data: bytes) -> list[Any]:
        try:
            events = self._parser.feed(data)
        except SSETooLarge as error:
            raise StreamBroken(
                f"{self.context.where} sent a streamed answer with {error}"
            ) from None
        outputs: list[Any] = []
        for event in events:
            self.events += 1
            outputs.extend(self.json_event(event, self._value(event)))
        return outputs

    @abstractmethod
    def json_event(self, event: Event, value: Any) -> list[Any]:
        """The outputs of one event whose data parsed as `value` (`[DONE]`: the string)."""

    def _value(self, event: Event) -> Any:
        data = event.data.strip()
        if data == "[DONE]":
            return data
        try:
            return fastjson.loads(data)
        except ValueError:
            # The message names the shape, never the bytes: they may be the model's output.
            raise StreamBroken(
                f"{self.context.where} sent a streamed event whose data is not JSON "
                f"({len(event.data)} characters)"
            ) from None

    def ended_wrong(self, why: str) -> StreamBroken:
        """StreamBroken for `why`, with a hint when the answer was not an event stream."""
        self._parser.close()
        hint = ""
        if not is_event_stream(self.context.content_type):
            media = (self.context.content_type or "no Content-Type").partition(";")[0]
            hint = f" (it answered {media}, not text/event-stream)"
        return StreamBroken(f"{self.context.where}: {why}{hint}")
