"""The Open Inference Protocol v2 over REST (KServe, MLServer, Triton): `infer` and `generate`.

`infer` posts the request body as the message carries it (`{"inputs": [...], ...}`) to
`{base}/v2/models/{name}[/versions/{version}]/infer`, `generate` to `.../generate` (the generate
extension). Bytes go to `infer` as BYTES tensors with the binary tensor data extension
(oip_binary.py). The answer is the inference response as the server sent it, binary outputs
turned into JSON. Errors (`{"error": "..."}`, FastAPI's `{"detail": ...}`) map by status
(base.status_error).

A streamed call (`call.stream`) goes to `.../infer_stream` or `.../generate_stream` (MLServer;
Triton's REST API has the latter), with a JSON body only: bytes are sent to `infer` alone, as
binary tensors, which no streaming endpoint is documented to take. Its answer is read as SSE
(stream_oip.py).
"""

from __future__ import annotations

from urllib.parse import quote

from shared.errors import BackendFailed, DispatchError, UnsupportedOperation
from shared.models import PredictionCall
from worker.backends.base import (
    Answer,
    BackendClient,
    Headers,
    Request,
    bearer,
    encode_json,
    parse_answer,
    status_error,
)
from worker.backends.oip_binary import HEADER_LENGTH, binary_response, bytes_request
from worker.http_client import Reply

JSON = ("Content-Type", "application/json")


def model_path(call: PredictionCall) -> str:
    """`/v2/models/{name}[/versions/{version}]`, each part percent-encoded."""
    path = f"/v2/models/{quote(call.model_name, safe='')}"
    if call.model_version:
        path += f"/versions/{quote(call.model_version, safe='')}"
    return path


class OpenInference(BackendClient):
    """Calls of one OIP backend: its URL, base path and token come from BACKENDS alone."""

    def request(self, call: PredictionCall, payload: bytes | None) -> Request:
        origin = self.backend.origin
        url = self.url(f"{model_path(call)}/{call.operation}{'_stream' if call.stream else ''}")
        if call.payload is not None and call.stream:
            raise UnsupportedOperation(
                f"{self.where(origin)}: a streamed call takes a JSON body, not bytes"
            )
        if call.payload is not None and payload is not None:
            if call.operation != "infer":
                raise UnsupportedOperation(
                    f"{self.where(origin)}: bytes go to the `infer` operation only (as BYTES "
                    f"tensors); `{call.operation}` takes a JSON body"
                )
            body, header_length = bytes_request(call.payload, payload)
            binary = (("Content-Type", "application/octet-stream"),
                      (HEADER_LENGTH, str(header_length)))  # fmt: skip
            return Request(origin, url, body, (*self._credentials(), *binary))
        body = b"" if call.body is None else encode_json(call.body)
        return Request(origin, url, body, (*self._credentials(), JSON))

    def answer(self, content: bytes, reply: Reply) -> Answer:
        header_length = reply.header(HEADER_LENGTH)
        if header_length is None:
            return parse_answer(content, reply.header("content-type"))
        try:
            return Answer(binary_response(content, int(header_length)))
        except ValueError as error:  # the message names the body's shape, never its bytes
            raise BackendFailed(
                f"{self.where(self.backend.origin)} sent a binary inference response that does "
                f"not parse: {error}"
            ) from None

    def error(
        self, status: int, content: bytes, reply: Reply, call: PredictionCall
    ) -> DispatchError:
        return status_error(self, status, content, reply, call)

    def _credentials(self) -> Headers:
        token = self.backend.token
        return (bearer(token.get_secret_value()),) if token else ()
