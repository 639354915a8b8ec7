"""Benchmark model: streams pieces to EVERY request of its batch at once, each with its send time.

Why batched: a TorchServe worker runs one batch at a time, so a model that streams one request
per worker would need a worker per concurrent stream; 1,000 streams on 2 cores would mean 1,000
Python processes. Registered with `batch_size` B, one worker streams to up to B requests: each
step is one `send_intermediate_predict_response` covering the whole batch (its
`context.request_ids`), which TorchServe turns into one HTTP/1.1 chunk per request.

A request's JSON body sets `n` (echoed, so a client can tell its pieces from another's),
`chunks` (default 10, at most 200) and `delay` (seconds between pieces, default 0.1, at most 5).
A batch shares one clock: its first request's `delay`; each request gets its own `chunks`.
A piece is one line of JSON, `{"n", "i" (its index), "of" (the request's chunks), "t" (the
model's time.time() when it sent it)}`, as tests/support/models/streaming.py writes them, so a
client measures each piece's added latency from the model's own send. A request's last piece is
the handler's return value (the batch's end), stamped when it is built.
"""

from __future__ import annotations

import json
import time
from typing import Any

from payload import json_body
from ts.handler_utils.utils import (  # type: ignore[import-untyped]  # TorchServe: no stubs
    send_intermediate_predict_response,
)

DEFAULT_CHUNKS, MAX_CHUNKS = 10, 200
DEFAULT_DELAY, MAX_DELAY = 0.1, 5.0


def _ask(request: dict[str, Any]) -> tuple[Any, int, float]:
    body = json_body(request)
    asked = body if isinstance(body, dict) else {}
    total = min(max(int(asked.get("chunks", DEFAULT_CHUNKS)), 1), MAX_CHUNKS)
    delay = min(max(float(asked.get("delay", DEFAULT_DELAY)), 0.0), MAX_DELAY)
    return asked.get("n"), total, delay


def _piece(n: Any, index: int, total: int) -> str:
    return json.dumps({"n": n, "i": index, "of": total, "t": time.time()}) + "\n"


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[str] | None:
    """TorchServe entry point: every piece but each request's last as it comes, then the last."""
    if data is None:  # TorchServe's initialization call
        return None
    asks = [_ask(request) for request in data]
    delay = asks[0][2]
    ids: dict[int, str] = context.request_ids
    steps = max(total for _, total, _ in asks) - 1
    for index in range(steps):
        # Only the requests with a piece still to come before their last one.
        going = {idx: rid for idx, rid in ids.items() if index < asks[idx][1] - 1}
        pieces = {idx: _piece(asks[idx][0], index, asks[idx][1]) for idx in going}
        send_intermediate_predict_response(pieces, going, "chunk", 200, context)
        time.sleep(delay)
    return [_piece(n, total - 1, total) for n, total, _ in asks]
