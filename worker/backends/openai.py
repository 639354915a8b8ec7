"""OpenAI-compatible servers (vLLM, llama.cpp, TGI, SGLang): chat completions, completions,
embeddings.

Each operation posts the JSON body as the message carries it (its `model` set from
`model_name`, by the API and again here for messages that lack it) to `{base}/v1/...`, with
`Authorization: Bearer <the backend's token>` when BACKENDS gives one. The answer is the
completion (or embedding) object as the server sent it. Errors come as OpenAI's
`{"error": {"message", "type", "code"}}` or the older flat `{"object": "error", "message"}`
(vLLM) and map by status (base.status_error).

A streamed call (`call.stream`) sends `"stream": true` and `"stream_options": {"include_usage":
true}` (so the assembled answer has its usage, as the non-streamed one does) and is read as SSE
(stream_openai.py). Embeddings do not stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.errors import DispatchError, UnsupportedOperation
from shared.models import PredictionCall
from worker.backends.base import (
    Answer,
    BackendClient,
    Request,
    bearer,
    encode_json,
    parse_answer,
    status_error,
)
from worker.http_client import Reply

PATHS: Mapping[str, str] = {
    "chat.completions": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}
# The operations whose answers stream (stream_openai.py assembles their final result).
STREAMED = frozenset({"chat.completions", "completions"})


class OpenAI(BackendClient):
    """Calls of one OpenAI-compatible backend; model versions have no place in its API."""

    def request(self, call: PredictionCall, payload: bytes | None) -> Request:
        origin = self.backend.origin
        if call.payload is not None:
            raise UnsupportedOperation(
                f"{self.where(origin)} takes JSON bodies; send the input as JSON, not bytes"
            )
        body = call.body
        if isinstance(body, dict) and body.get("model") != call.model_name:
            body = {**body, "model": call.model_name}
        if call.stream:
            body = self._streamed(call, body)
        headers = [("Content-Type", "application/json")]
        if self.backend.token is not None:
            headers.insert(0, bearer(self.backend.token.get_secret_value()))
        return Request(origin, self.url(PATHS[call.operation]), encode_json(body), tuple(headers))

    def _streamed(self, call: PredictionCall, body: Any) -> dict[str, Any]:
        """The body of a streamed call: what it asked, with the stream (and its usage) asked
        for; a stream_options it sent is kept."""
        where = self.where(self.backend.origin)
        if call.operation not in STREAMED:
            raise UnsupportedOperation(f"{where}: `{call.operation}` does not stream")
        if not isinstance(body, dict):
            raise UnsupportedOperation(f"{where}: a streamed call takes a JSON object body")
        options = body.get("stream_options")
        options = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return {**body, "stream": True, "stream_options": options}

    def answer(self, content: bytes, reply: Reply) -> Answer:
        return parse_answer(content, reply.header("content-type"))

    def error(
        self, status: int, content: bytes, reply: Reply, call: PredictionCall
    ) -> DispatchError:
        return status_error(self, status, content, reply, call)
