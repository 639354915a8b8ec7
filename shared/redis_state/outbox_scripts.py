"""The webhook outbox, and typed calls of its scripts (lua/outbox_*.lua).

A transition script that moves a task with a `webhook` into a subscribed state calls lib.lua's
`emit_webhook`: in the same atomic script it writes the event (its webhook-id, type, time, URL
and a snapshot of the task record) and adds it to the due set (keys.DUE_KEY), scored by when it
is due. So an event exists exactly when its transition happened: no crash between "state
changed" and "event queued" can lose it. A streamed task's `task.output` events are written the
same way by the append of its output (lua/stream_append.lua) and read their outputs from its
stream when first claimed (shared/webhook_output.py says how they are coalesced).

The due set is the durable schedule; the Celery queue `webhooks` only carries "send this now".
The relay in each webhook consumer (worker/webhooks.py) moves due events onto that queue
(outbox_promote), a consumer claims one (outbox_claim), sends it, and records the outcome
(outbox_outcome: done, or due again later). Every step leaves the event in the due set with a
lease score, so an event whose consumer died (SIGKILL mid-send, a prefetched message lost) comes
due again and is sent later, with the same webhook-id. Long retry delays are scores in this set,
never Celery ETAs: a message held for hours by a worker would be redelivered by the broker's
visibility timeout long before its ETA.

Messages carry the event's `ticket`; a claim accepts only the current one and moves it on, so
the duplicates that at-least-once delivery makes (a re-promoted event, a restored unacked
message) are skipped instead of sent twice.

The consumers (sync) promote, claim, record outcomes and defer; the API (asyncio) retries.
"""

from __future__ import annotations

from typing import cast

from shared.redis_state.keys import DUE_KEY, LOG_LIMIT, event_key, log_key
from shared.redis_state.loader import AsyncWrapper, SyncWrapper, text
from shared.webhook_output import PACING, OutputPacing


class PromoteEvents(SyncWrapper):
    """outbox_promote: leases the events due now, to put one message each on the queue."""

    name = "outbox_promote"

    def __call__(self, *, now: float, lease: float, limit: int) -> list[tuple[str, str]]:
        """(event id, ticket) of at most `limit` due events; each is due again after `lease`."""
        flat = [text(item) for item in self._script(keys=[DUE_KEY], args=[now, lease, limit])]
        return list(zip(flat[::2], flat[1::2], strict=True))


class ClaimEvent(SyncWrapper):
    """outbox_claim: takes one event to send, if the message's ticket is the current one."""

    name = "outbox_claim"

    def __call__(
        self, event_id: str, ticket: str, *, now: float, lease: float,
        pacing: OutputPacing = PACING,
    ) -> dict[str, str]:  # fmt: skip
        """The event's fields (state sending, its attempt counted), or {} for a stale message.
        It is due again after `lease` unless its outcome is recorded first. A task.output
        event's first claim reads its outputs in, within `pacing` (shared/webhook_output.py)."""
        args: list[str | float] = [event_id, ticket, now, lease, pacing.interval]
        args += [pacing.max_entries, pacing.max_bytes]
        flat = [text(item) for item in self._script(keys=[event_key(event_id), DUE_KEY], args=args)]
        return dict(zip(flat[::2], flat[1::2], strict=True))


class RecordOutcome(SyncWrapper):
    """outbox_outcome: logs one attempt and, if the claim is still current, what comes next."""

    name = "outbox_outcome"

    def __call__(
        self, event_id: str, ticket: str, task_id: str, *, attempt: str, state: str, due: float,
        log_ttl: int,
    ) -> bool:  # fmt: skip
        """`ticket`: the event's after the claim; `attempt`: the log entry (JSON); `state`:
        'pending' (due again at `due`) or a final one. False when the claim was superseded."""
        keys = [event_key(event_id), DUE_KEY, log_key(task_id)]
        args: list[str | float] = [event_id, ticket, attempt, state, due, log_ttl, LOG_LIMIT]
        return bool(self._script(keys=keys, args=args))


class DeferEvent(SyncWrapper):
    """outbox_defer: gives a queued event back unsent, its attempt uncounted."""

    name = "outbox_defer"

    def __call__(self, event_id: str, ticket: str, *, due: float) -> bool:
        """False for a stale message."""
        keys = [event_key(event_id), DUE_KEY]
        return bool(self._script(keys=keys, args=[event_id, ticket, due]))


class RetryEvent(AsyncWrapper):
    """outbox_retry: sends an event again now, with a fresh budget of attempts."""

    name = "outbox_retry"

    async def __call__(self, event_id: str, *, now: float) -> bool:
        """False when the event does not exist (expired)."""
        keys = [event_key(event_id), DUE_KEY]
        return bool(cast(int, await self._script(keys=keys, args=[event_id, now])))
