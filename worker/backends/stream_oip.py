"""Open Inference Protocol streams over REST: `infer_stream` and `generate_stream` as SSE.

MLServer and Triton send Server-Sent Events whose every `data:` is one inference (or generate)
response, as the non-streamed endpoint would send it.

Each response is output as it came. The final result is the last response: neither protocol
says how responses add up. Triton's generate extension says only that `generate_stream` "may
return multiple responses", each the same object `generate` returns; whether a `text_output` is
the new text or all of it so far is the model's choice (Triton's vLLM backend sends the new
text, `exclude_input_in_output` aside; an ensemble may send either), and MLServer's streams are
whatever the runtime yields. Joining them would be a guess that is wrong for half the models; a
client that wants the text joins the `output` events it already has.

An `{"error": "..."}` after the 200 (Triton: "the user must always check whether an error
object is received") is BackendFailed; its text is not kept, as base.status_error keeps none of
a server error's (a 500 may quote the input). A stream that ends before any response is
StreamBroken. `[DONE]`, which OIP does not send but a proxy in front may, is skipped.
"""

from __future__ import annotations

from typing import Any

from shared.errors import BackendFailed, StreamBroken
from worker.backends.base import Answer
from worker.backends.stream_decoder import SSEStreamDecoder, StreamContext
from worker.backends.stream_sse import Event


class OIPStream(SSEStreamDecoder):
    """One OIP streamed answer: outputs are the inference (or generate) responses."""

    def __init__(self, context: StreamContext) -> None:
        super().__init__(context)
        self.last: dict[str, Any] | None = None
        self.responses = 0

    def json_event(self, event: Event, value: Any) -> list[Any]:
        if value == "[DONE]":
            return []
        if event.event == "error" or (isinstance(value, dict) and value.get("error") is not None):
            raise BackendFailed(
                f"{self.context.where} failed mid-stream after {self.responses} "
                f"response{'' if self.responses == 1 else 's'}; see the backend's log for its "
                "message"
            )
        if not isinstance(value, dict):
            raise StreamBroken(
                f"{self.context.where} sent a streamed response that is not an object "
                f"({type(value).__name__})"
            )
        self.last = value
        self.responses += 1
        return [value]

    def end(self) -> Answer:
        if self.last is None:
            raise self.ended_wrong("the stream ended before any response")
        return Answer(self.last)
