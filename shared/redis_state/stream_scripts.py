"""Typed call of lua/stream_append.lua: the only code that knows its arguments.

A streamed task's writer (its worker, for each chunk and for the ending) appends through
`AppendToStream`. The script checks and writes in one step, so the caps hold however many
writers race, and a refused append writes nothing: the caller learns it from the outcome and
fails the task with that error, rather than a chunk being dropped from the middle of the
stream. A writer must stop appending output once refused (a later, smaller chunk could fit,
and the stream would have a hole). The same step writes the task's `task.output` webhook event
when its output calls for one (shared/webhook_output.py), so an output and its event cannot be
separated by a crash.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum

from shared.redis_state.keys import output_key, stream_key, task_key
from shared.redis_state.loader import AsyncWrapper, text
from shared.redis_state.streams import StreamKind
from shared.settings import Settings
from shared.webhook_output import PACING


class AppendOutcome(str, Enum):
    """What stream_append did (its header in lua/ says when each happens)."""

    appended = "appended"
    ended = "ended"  # the stream already holds its error or done
    stale = "stale"  # an older attempt's writer, or a second restart of the same attempt
    too_many_entries = "too_many_entries"  # past STREAM_MAX_ENTRIES output entries
    too_many_bytes = "too_many_bytes"  # past STREAM_MAX_BYTES of output data

    @property
    def over_cap(self) -> bool:
        return self in (AppendOutcome.too_many_entries, AppendOutcome.too_many_bytes)


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """One attempt's caps and the stream's TTL: STREAM_MAX_ENTRIES, STREAM_MAX_BYTES and
    RESULT_TTL (Settings), the same for every append of a process."""

    max_entries: int
    max_bytes: int
    ttl: int  # seconds

    @classmethod
    def of(cls, settings: Settings) -> StreamLimits:
        return cls(settings.stream_max_entries, settings.stream_max_bytes, settings.result_ttl)

    def refusal(self, outcome: AppendOutcome) -> str | None:
        """The error message of an append refused for a cap (None for any other outcome): it
        names the setting and its value, never the data."""
        if outcome is AppendOutcome.too_many_entries:
            return (
                f"the task's stream reached STREAM_MAX_ENTRIES ({self.max_entries} chunks in "
                "one attempt)"
            )
        if outcome is AppendOutcome.too_many_bytes:
            return (
                f"the task's stream reached STREAM_MAX_BYTES ({self.max_bytes} bytes in one "
                "attempt)"
            )
        return None


@dataclass(frozen=True, slots=True)
class Appended:
    """stream_append's reply: its outcome and the ids it wrote (a restart mark's first)."""

    outcome: AppendOutcome
    ids: tuple[str, ...] = ()


class AppendToStream(AsyncWrapper):
    """stream_append: one event onto a task's stream, within its attempt's caps."""

    name = "stream_append"

    async def __call__(
        self, task_id: str, kind: StreamKind, data: str, *, attempt: int, limits: StreamLimits,
        now: float | None = None,
    ) -> Appended:  # fmt: skip
        """`attempt`: the writer's delivery of the task (from 1); a newer one than the stream's
        starts with a restart mark. `data`: the event's text (JSON, UTF-8 text or a data URI).
        An output of a task subscribed to task.output may write that event, due no earlier
        than PACING.interval after the task's previous one (`now`: default the clock's)."""
        if attempt < 1:
            raise ValueError("attempt counts deliveries, from 1")
        at = time.time() if now is None else now
        keys = [stream_key(task_id), task_key(task_id), output_key(task_id)]
        args: list[str | float] = [kind.value, attempt, data, limits.max_entries]
        args += [limits.max_bytes, limits.ttl, task_id, at, PACING.interval]
        reply = await self._script(keys=keys, args=args)
        return Appended(AppendOutcome(text(reply[0])), tuple(text(item) for item in reply[1:]))
