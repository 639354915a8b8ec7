"""Shared by the test models (archived next to each as an extra file): the request's JSON body."""

from __future__ import annotations

import json
from typing import Any


def json_body(request: dict[str, Any]) -> Any:
    """TorchServe gives a dict for application/json, bytes or str otherwise; decode those."""
    body = request.get("body", request.get("data"))
    if isinstance(body, bytes | bytearray):
        body = body.decode("utf-8", errors="replace")
    if isinstance(body, str):
        try:
            return json.loads(body)
        except ValueError:
            return body
    return body
