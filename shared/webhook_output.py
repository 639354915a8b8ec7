"""The `task.output` webhook event: a streamed task's outputs, coalesced, and its body.

A client that asks for `stream: true` may list `task.output` in `webhook_events`. Sending one
event per chunk would be a request per token, so chunks are coalesced: the chunk that finds the
task without a task.output waiting to be sent writes one (lua/stream_append.lua), due at once or
`interval` after the previous one was read, whichever is later; the chunks after it add nothing
to Redis but a stream entry, since the event reads its outputs from the task's stream only when
a consumer claims it to send it (lib.lua read_outputs, in lua/outbox_claim.lua). So a task sends
at most one task.output per `interval` (retries of one aside), and each carries every output
since the previous one. It keeps what it read: its retries send the same outputs under the same
webhook-id, and the next one starts after it, so no chunk goes out in two events.

The outputs are the stream's own entries with their ids, so a receiver can go on with
`GET /tasks/{id}/stream?last_event_id=<last_event_id>`. One event carries at most `max_entries`
entries and `max_bytes` of data; what a cap leaves out goes in the next one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

OUTPUT_EVENT = "task.output"


@dataclass(frozen=True, slots=True)
class OutputPacing:
    """How task.output events are paced and bounded (the same for every process)."""

    interval: float = 0.5  # seconds: the least time between two of a task's task.output events
    max_entries: int = 200  # stream entries in one event
    max_bytes: int = 256 * 1024  # their data bytes (one entry goes out whatever its size)


PACING = OutputPacing()


def output_data(event: Mapping[str, str]) -> dict[str, Any]:
    """The `data` of a task.output body, from its outbox event as outbox_claim returned it.

    `events` are the stream's entries as GET /tasks/{id}/stream sends them: `output` with the
    chunk (parsed JSON, as the SSE event's data), `restart` with `{"attempt": n}`."""
    task_id = event["task_id"]
    entries: list[dict[str, Any]] = []
    for entry_id, kind, attempt, data in json.loads(event.get("outputs") or "[]"):
        value: Any = {"attempt": attempt} if kind == "restart" else _parsed(data)
        entries.append({"id": entry_id, "event": kind, "data": value})
    start = event.get("from", "0-0")
    return {
        "task_id": task_id,
        "status": event.get("status") or None,
        "seq": int(event["seq"]),
        "from": start,
        "last_event_id": event.get("last_event_id", start),
        "final": event.get("final") == "1",
        "stream_url": f"/tasks/{task_id}/stream",
        "events": entries,
    }


def output_body(event: Mapping[str, str]) -> bytes:
    """`{"type": "task.output", "timestamp", "data"}`; the timestamp is when it was read."""
    at = datetime.fromtimestamp(float(event["at"]), UTC)
    body = {
        "type": OUTPUT_EVENT,
        "timestamp": at.isoformat().replace("+00:00", "Z"),
        "data": output_data(event),
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _parsed(data: str) -> Any:
    # The worker writes every output as JSON text (worker/stream_writer.py); anything else is
    # passed on as the text it is rather than failing the send.
    try:
        return json.loads(data)
    except ValueError:
        return data
