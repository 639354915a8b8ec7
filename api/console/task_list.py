"""The console's task lists: the newest tasks and the newest failures, filtered.

Both lists are bounded in Redis (RECENT_KEY, RECENT_FAILED_KEY: the newest RECENT_LIMIT ids,
trimmed by the scripts that add to them), so the console never keeps a history of its own and
its memory and cost do not grow with traffic (Flower's in-memory history does). One read is one
LRANGE and one pipeline of HMGETs: only the fields a row shows, never the stored answer, which
may be megabytes; records that expired meanwhile are skipped.

A tenant's list is filtered to its own tasks before anything else, whatever the query says.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import redis.asyncio as aioredis

from shared.models import TaskView
from shared.redis_state.keys import RECENT_FAILED_KEY, RECENT_KEY, RECENT_LIMIT, task_key
from shared.redis_state.record import TaskField, decode_record

# What a row needs (decode_record's required fields among them); not `result`.
ROW_FIELDS: tuple[str, ...] = tuple(
    f.value for f in TaskField if f not in (TaskField.result, TaskField.webhook, TaskField.message)
)
LISTS = {"recent": RECENT_KEY, "failed": RECENT_FAILED_KEY}
PAGE_SIZE = 100


@dataclass(frozen=True, slots=True)
class Row:
    """A task as a list shows it."""

    view: TaskView
    owner: str

    @property
    def code(self) -> str | None:
        return self.view.error.code if self.view.error else None


@dataclass(frozen=True, slots=True)
class Filters:
    """What the list is narrowed to; an empty value filters nothing."""

    model: str = ""
    status: str = ""
    code: str = ""
    priority: str = ""
    owner: str = ""

    def keep(self, row: Row) -> bool:
        view = row.view
        return (
            (not self.model or view.model_name == self.model)
            and (not self.status or view.status.value == self.status)
            and (not self.code or row.code == self.code)
            and (not self.priority or view.priority.value == self.priority)
            and (not self.owner or row.owner == self.owner)
        )

    def active(self) -> bool:
        return any((self.model, self.status, self.code, self.priority, self.owner))


@dataclass(frozen=True, slots=True)
class TaskList:
    """One page of a filtered list, and what the filters' menus offer."""

    rows: list[Row]
    matched: int  # rows matching the filters, over every page
    scanned: int  # records read (ids whose record expired are not counted)
    page: int
    pages: int
    models: list[str] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
    owners: list[str] = field(default_factory=list)


def row_of(task_id: str, values: Sequence[str | None]) -> Row | None:
    """A row from HMGET's answer for ROW_FIELDS; None when the record is gone or unreadable."""
    fields = {name: value for name, value in zip(ROW_FIELDS, values, strict=True) if value}
    if "status" not in fields or "created_at" not in fields:
        return None
    try:
        view = decode_record(task_id, fields)
    except (KeyError, ValueError):
        return None  # a record half-written by an older version: not listable
    return Row(view, fields.get("owner", ""))


async def read_rows(client: aioredis.Redis, which: str, owner: str | None = None) -> list[Row]:
    """The list's tasks, newest first; only `owner`'s when given (a tenant)."""
    ids = cast(list[str], await client.lrange(LISTS[which], 0, RECENT_LIMIT - 1))
    ids = list(dict.fromkeys(ids))  # an id listed twice (never expected) shows once
    async with client.pipeline(transaction=False) as pipe:
        for task_id in ids:
            pipe.hmget(task_key(task_id), list(ROW_FIELDS))
        replies = await pipe.execute()
    rows = [row_of(task_id, reply) for task_id, reply in zip(ids, replies, strict=True)]
    return [r for r in rows if r is not None and (owner is None or r.owner == owner)]


def select(rows: list[Row], filters: Filters, page: int = 1, size: int = PAGE_SIZE) -> TaskList:
    """The filtered rows' page `page` (1-based; clamped), with the menus' choices."""
    matched = [row for row in rows if filters.keep(row)]
    pages = max((len(matched) + size - 1) // size, 1)
    page = min(max(page, 1), pages)
    codes = Counter(row.code for row in rows if row.code)
    return TaskList(
        rows=matched[(page - 1) * size : page * size],
        matched=len(matched),
        scanned=len(rows),
        page=page,
        pages=pages,
        models=sorted({row.view.model_name for row in rows}),
        codes=[code for code, _ in codes.most_common()],
        owners=sorted({row.owner for row in rows if row.owner}),
    )
