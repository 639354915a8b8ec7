"""The messages on FINISHED_CHANNEL (keys.py), as lib.lua's publish_record and end_batch send them.

Each is a JSON array: `[id, [field, value, ...]]`, the ended task's whole record or the ended
batch's hash, or `[task id]` alone when the task's result is longer than PUBLISH_INLINE_BYTES
(every API process receives every message; the one waiting reads the record).
"""

from __future__ import annotations

import json

from shared.redis_state.record import as_mapping


def parse_published(message: str) -> tuple[str, dict[str, str] | None]:
    """(id, fields) of a message; None when the record was left out (a big result: read it)."""
    task_id, *flat = json.loads(message)
    if not flat:
        return task_id, None
    return task_id, as_mapping(flat[0])


def published_task_id(message: str) -> str:
    """The id alone, without parsing the record (most messages are for other processes)."""
    return message.split('"', 2)[1]
