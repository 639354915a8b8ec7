"""OpenAI-compatible streams (vLLM, llama.cpp, TGI, OpenAI): `data: {chunk}` ... `data: [DONE]`.

Each event's data is one chunk object (`chat.completion.chunk`, or `text_completion` for
completions), output as it came and added to the assembler (stream_assemble.py), whose object
is the final result. `[DONE]` ends the stream; anything after it is not read.

A stream fails when:
- a chunk is an error, after the 200 already went out: `{"error": {"message", "type", "code"}}`
  (OpenAI, llama.cpp, vLLM since 0.6), `{"object": "error", ...}` (older vLLM), or an
  `event: error`. As base.status_error reads an error status: one that says the input was
  wrong (a 4xx code, or an invalid-request type) is ModelRejectedInput with the server's message
  (redacted, cut to MESSAGE_CHARS); any other is BackendFailed naming only its type and code,
  since a server error's text may quote the input;
- it ends with neither `[DONE]` nor a finish reason: StreamBroken ("stream ended without
  [DONE]"). A finish reason without `[DONE]` is a complete answer (TGI before 2.0 sent none).
"""

from __future__ import annotations

from typing import Any

from shared.errors import BackendFailed, DispatchError, ModelRejectedInput, StreamBroken
from worker.backends.base import MESSAGE_CHARS, Answer
from worker.backends.stream_assemble import Assembler
from worker.backends.stream_decoder import SSEStreamDecoder, StreamContext
from worker.backends.stream_sse import Event

# Error types that mean the request was wrong, as OpenAI, vLLM and llama.cpp name them.
INPUT_ERROR_TYPES = frozenset(
    {
        "invalid_request_error",  # OpenAI, llama.cpp
        "exceed_context_size_error",  # llama.cpp
        "not_supported_error",  # llama.cpp
        "BadRequestError",  # vLLM
        "NotFoundError",  # vLLM
    }
)


class OpenAIStream(SSEStreamDecoder):
    """One OpenAI-compatible streamed answer: outputs are the chunk objects."""

    def __init__(self, context: StreamContext) -> None:
        super().__init__(context)
        self.assembler = Assembler(context.operation)
        self.done = False

    def feed(self, data: bytes) -> list[Any]:
        if self.done:  # [DONE] ends the stream: what a server sends after it is not read
            return []
        return super().feed(data)

    def json_event(self, event: Event, value: Any) -> list[Any]:
        if self.done:
            return []
        if value == "[DONE]":
            self.done = True
            return []
        if isinstance(value, dict) and (
            event.event == "error"
            or value.get("error") is not None
            or value.get("object") == "error"
        ):
            raise self.error_chunk(value)
        if event.event == "error":
            raise BackendFailed(f"{self.context.where} sent an error event mid-stream")
        if not isinstance(value, dict):
            raise StreamBroken(
                f"{self.context.where} sent a streamed chunk that is not an object "
                f"({type(value).__name__})"
            )
        self.assembler.add(value)
        return [value]

    def end(self) -> Answer:
        if not (self.done or self.assembler.finished):
            raise self.ended_wrong("the stream ended without [DONE] and without a finish_reason")
        return Answer(self.assembler.result())

    def error_chunk(self, chunk: dict[str, Any]) -> DispatchError:
        """The error of an error chunk sent after the 200 (see the module's docstring)."""
        error = chunk.get("error")
        if not isinstance(error, dict):
            error = chunk if error is None else {"message": error}
        kind, code = error.get("type"), error.get("code")
        status = code if isinstance(code, int) else None
        where = self.context.where
        if (status is not None and 400 <= status < 500) or kind in INPUT_ERROR_TYPES:
            message = error.get("message")
            text = message if isinstance(message, str) else ""
            said = f": {self.context.redact(text.strip())[:MESSAGE_CHARS]}" if text.strip() else ""
            return ModelRejectedInput(f"{where} rejected the input mid-stream{said}", status=422)
        named = ", ".join(
            f"{label} {self.context.redact(str(value))[:64]!r}"
            for label, value in (("type", kind), ("code", code))
            if value is not None
        )
        return BackendFailed(
            f"{where} failed mid-stream{f' ({named})' if named else ''}; see the backend's log "
            "for its message"
        )
