"""The KServe 0.21 model server the backend tests run against: `digest` and `sum` over OIP v2 REST.

Run by tests/support/servers/kserve.py with the KServe venv's python (never imported by pytest:
kserve, numpy and their stubs are not in the project's venv, hence the type-ignores):

    python kserve_model.py --http_port P --grpc_port Q

- `digest`: a BYTES tensor in, its elements' sha256 hex (`sha256`, BYTES) and length (`length`,
  INT64) out. It exists to prove that bytes sent with the binary tensor data extension
  (`Inference-Header-Content-Length`: a JSON header, then raw bytes) reach the model unchanged,
  which the dispatcher's tests compare against hashlib. KServe 0.21 decodes such a BYTES input
  (4-byte little-endian length before each element, as Triton does) and then turns every element
  into a UTF-8 `str` (`InferRequest.from_bytes` -> `set_data_from_numpy(binary_data=False)`), so
  the model sees `str` for valid UTF-8 and never the raw buffer; other bytes are refused before
  the model runs. The model encodes the strings back to UTF-8, which gives the bytes that were
  sent.
- `sum`: the sum of an FP32 tensor of any shape, as FP32 [1]: a plain numeric model.

KServe's REST server binds 0.0.0.0 with no option to change it; the project's rule is that
every test server binds 127.0.0.1, so `RESTServer.__init__` is wrapped to set uvicorn's host.
"""

from __future__ import annotations

import argparse
import hashlib
import uuid
from typing import Any

import numpy as np  # type: ignore[import-not-found]
from kserve import Model, ModelServer  # type: ignore[import-not-found]
from kserve.errors import InvalidInput  # type: ignore[import-not-found]
from kserve.protocol.infer_type import (  # type: ignore[import-not-found]
    InferOutput,
    InferRequest,
    InferResponse,
)
from kserve.protocol.rest import server as rest_server  # type: ignore[import-not-found]

HOST = "127.0.0.1"


def _bind_loopback() -> None:
    """Make KServe's uvicorn listen on 127.0.0.1 instead of its hard-coded 0.0.0.0."""
    original = rest_server.RESTServer.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.config.host = HOST

    rest_server.RESTServer.__init__ = init


def _element_bytes(element: object) -> bytes:
    """One BYTES element as the client sent it: KServe hands over `str` (decoded UTF-8) or bytes."""
    if isinstance(element, bytes):
        return element
    if isinstance(element, str):
        return element.encode("utf-8")
    raise TypeError(f"unexpected BYTES element type {type(element).__name__}")


def _only_input(request: InferRequest, datatype: str) -> Any:
    """The request's one input tensor, checked: bad input is InvalidInput, which KServe answers
    400. Any other exception is a 500, after which KServe drops the kept-alive connection."""
    if len(request.inputs) != 1:
        raise InvalidInput(
            f"{request.model_name} takes one input tensor, got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    if tensor.datatype != datatype:
        raise InvalidInput(f"{request.model_name} takes {datatype}, not {tensor.datatype}")
    return tensor


def _response(request: InferRequest, outputs: list[InferOutput]) -> InferResponse:
    # KServe answers 500 for a response without an id: echo the request's, else make one.
    return InferResponse(
        response_id=request.id or str(uuid.uuid4()),
        model_name=request.model_name,
        infer_outputs=outputs,
    )


class Digest(Model):  # type: ignore[misc]
    """sha256 hex and length of every element of the BYTES input `data`."""

    def __init__(self, name: str = "digest") -> None:
        super().__init__(name)
        self.ready = True

    async def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        tensor = _only_input(payload, "BYTES")
        elements = [_element_bytes(item) for item in np.asarray(tensor.data).reshape(-1)]
        count = len(elements)
        hexes = [hashlib.sha256(element).hexdigest() for element in elements]
        lengths = [len(element) for element in elements]
        return _response(
            payload,
            [
                InferOutput(name="sha256", shape=[count], datatype="BYTES", data=hexes),
                InferOutput(name="length", shape=[count], datatype="INT64", data=lengths),
            ],
        )


class Sum(Model):  # type: ignore[misc]
    """The sum of the FP32 input tensor, as FP32 [1] `sum`."""

    def __init__(self, name: str = "sum") -> None:
        super().__init__(name)
        self.ready = True

    async def predict(
        self,
        payload: InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        tensor = _only_input(payload, "FP32")
        try:
            values = np.asarray(tensor.as_numpy(), dtype=np.float32)
        except ValueError as error:  # data that does not fit the shape
            raise InvalidInput(f"sum: {error}") from None
        total = float(values.sum(dtype=np.float32))
        return _response(
            payload, [InferOutput(name="sum", shape=[1], datatype="FP32", data=[total])]
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--http_port", type=int, required=True)
    parser.add_argument("--grpc_port", type=int, required=True)
    # KServe parses sys.argv itself at import (parse_known_args): use only flags it also knows.
    options, _ = parser.parse_known_args()
    _bind_loopback()
    server = ModelServer(
        http_port=options.http_port, grpc_port=options.grpc_port, enable_grpc=False
    )
    server.start([Digest(), Sum()])


if __name__ == "__main__":
    main()
