"""Test model: streams `chunks` pieces `delay` seconds apart, each one HTTP/1.1 chunk (TorchServe).

A JSON object body sets `chunks` (default 8, at most 200), `delay` (seconds, default 0.1, at
most 5) and `text` (default false). Each piece but the last goes out at once through
`send_intermediate_predict_response` (one chunk per call, TorchServe 0.8.0 and newer); the
last is the handler's return value. A piece is one line of JSON, `{"i": index, "of": chunks,
"t": the model's clock when it sent it}`, so a test can time each piece from the model's own
send; with `text: true` it is the word `tok<i> ` instead. Read without streaming, the body is
the pieces' concatenation, which is what a streamed task's final result must equal.
"""

from __future__ import annotations

import json
import time
from typing import Any

from payload import json_body
from ts.handler_utils.utils import send_intermediate_predict_response

DEFAULT_CHUNKS, MAX_CHUNKS = 8, 200
DEFAULT_DELAY, MAX_DELAY = 0.1, 5.0


def _piece(index: int, total: int, text: bool) -> str:
    if text:
        return f"tok{index} "
    return json.dumps({"i": index, "of": total, "t": time.time()}) + "\n"


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    if data is None:
        return None
    body = json_body(data[0])
    asked = body if isinstance(body, dict) else {}
    total = min(max(int(asked.get("chunks", DEFAULT_CHUNKS)), 1), MAX_CHUNKS)
    delay = min(max(float(asked.get("delay", DEFAULT_DELAY)), 0.0), MAX_DELAY)
    text = bool(asked.get("text", False))
    for index in range(total - 1):
        piece = _piece(index, total, text)
        send_intermediate_predict_response([piece], context.request_ids, "chunk", 200, context)
        time.sleep(delay)
    # One request per call (batch size 1): the last piece is the answer TorchServe ends with.
    return [_piece(total - 1, total, text)]
