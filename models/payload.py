"""Shared by the model handlers (archived next to each as an extra file): the request's body.

TorchServe puts the model's directory on the worker's sys.path, so a handler imports this as
`from payload import json_body`. Used by models/, tests/models/ and bench/models/.
"""

from __future__ import annotations

import json
from typing import Any


def json_body(request: dict[str, Any]) -> Any:
    """The request's payload: TorchServe gives a dict for application/json, bytes or str
    otherwise; those are decoded as JSON, and text that is not JSON is returned as it is."""
    body = request.get("body", request.get("data"))
    if isinstance(body, bytes | bytearray):
        body = body.decode("utf-8", errors="replace")
    if isinstance(body, str):
        try:
            return json.loads(body)
        except ValueError:
            return body
    return body
