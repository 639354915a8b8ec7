"""TorchServe streams: each `send_intermediate_predict_response` is one HTTP/1.1 chunk.

TorchServe (0.8.0 on) writes every intermediate response of a streaming handler, and then the
handler's return value, as one chunk of a chunked 200, so the transport's chunk boundaries are
the outputs' (the caller calls `chunk_end` at each; nothing in the bytes themselves frames
them). Each chunk is decoded on its own as base.parse_answer decodes a whole answer, with the
200's Content-Type: parsed JSON if it is JSON, text if it decodes, else a data URI (a chunk is a
whole message, so a character never straddles two). The final result is the concatenated body
parsed as the non-streamed answer is, so it equals what a request without streaming returns.

One chunk over `max_event_bytes` is StreamBroken; the whole body is bounded as a non-streamed
answer is (by what the caller reads).
"""

from __future__ import annotations

from typing import Any

from shared.errors import StreamBroken
from worker.backends.base import Answer, parse_answer
from worker.backends.stream_decoder import StreamContext, StreamDecoder


class TorchServeStream(StreamDecoder):
    """One TorchServe streamed answer: outputs are its HTTP chunks, decoded."""

    def __init__(self, context: StreamContext) -> None:
        super().__init__(context)
        self._body = bytearray()
        self._chunk_start = 0  # where the chunk being read starts in the body

    def feed(self, data: bytes) -> list[Any]:
        self._body += data
        if len(self._body) - self._chunk_start > self.context.max_event_bytes:
            raise StreamBroken(
                f"{self.context.where} sent a streamed chunk over "
                f"{self.context.max_event_bytes} bytes"
            )
        return []

    def chunk_end(self) -> list[Any]:
        chunk = bytes(self._body[self._chunk_start :])
        self._chunk_start = len(self._body)
        if not chunk:  # the last, empty chunk of a chunked body, or a repeated call
            return []
        return [parse_answer(chunk, self.context.content_type).value]

    def end(self) -> Answer:
        return parse_answer(bytes(self._body), self.context.content_type)
