"""The batch hash: one hash of counters per batch, kept by its tasks' own transition scripts.

A batch `<id>` of N requests is the hash `K.batch .. <id>` (keys.py: owner, timestamps, status,
the webhook, and one counter per task status) plus N ordinary tasks `<id>-0` ... `<id>-<N-1>`,
whose records carry `batch` and `custom_id`. Task ids follow from the batch id and the index,
so no list of 10,000 ids is stored and results are read in input order by index.

Counts stay cheap: every transition script calls lib.lua's `batch_move` in the same atomic step
that changes the task, so `GET /batches/{id}` reads one hash instead of 10,000 records, and the
transition that ends the last item also ends the batch (lib.lua `end_batch`): status `completed`
(or `canceled` after a DELETE), its `batch.completed` webhook event written to the outbox, and
the batch's hash published on the channel every waiter listens to (api/waiting.py), so
`?wait=N` needs no polling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from pydantic import BaseModel

# The task statuses a batch counts, in the order `request_counts` shows them.
COUNTED = ("queued", "running", "succeeded", "failed", "canceled", "expired")
BATCH_EVENTS = ("batch.completed",)


class BatchField(str, Enum):
    """The fields of a batch hash beside the COUNTED counters, and which script writes each."""

    status = "status"  # BatchStatus; batch_create, batch_mark_canceling, lib.lua end_batch
    total = "total"  # batch_create: the number of items
    created_at = "created_at"  # batch_create; epoch seconds
    owner = "owner"  # batch_create; the caller's name, checked on every read
    ttl = "ttl"  # batch_create: RESULT_TTL, kept by the batch once it ends
    webhook = "webhook"  # batch_create, with batch.completed subscribed
    webhook_events = "webhook_events"  # batch_create: the batch's own subscribed types
    ended = "ended"  # lib.lua batch_move: items ended so far
    cancel_requested_at = "cancel_requested_at"  # batch_mark_canceling
    finished_at = "finished_at"  # lib.lua end_batch
    webhook_event = "webhook_event"  # lib.lua emit_event: the batch.completed event's id


def item_task_id(batch_id: str, index: int) -> str:
    return f"{batch_id}-{index}"


@dataclass(frozen=True, slots=True)
class NewBatch:
    """What batch_create writes into the batch hash."""

    total: int
    created_at: float
    owner: str
    ttl: int  # RESULT_TTL
    webhook: str | None = None
    webhook_events: Sequence[str] = ()

    def fields(self) -> list[str]:
        """Field, value, ...: every item counted as queued."""
        fields = [
            BatchField.status.value, BatchStatus.in_progress.value,
            BatchField.total.value, str(self.total),
            "queued", str(self.total),
            BatchField.created_at.value, repr(self.created_at),
            BatchField.owner.value, self.owner,
            BatchField.ttl.value, str(self.ttl),
        ]  # fmt: skip
        if self.webhook and self.webhook_events:
            fields += [BatchField.webhook.value, self.webhook]
            fields += [BatchField.webhook_events.value, ",".join(self.webhook_events)]
        return fields


class BatchStatus(str, Enum):
    in_progress = "in_progress"
    canceling = "canceling"  # DELETE canceled the queued items; running ones still finish
    completed = "completed"
    canceled = "canceled"

    @property
    def ended(self) -> bool:
        return self in (BatchStatus.completed, BatchStatus.canceled)


class RequestCounts(BaseModel):
    total: int
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0
    expired: int = 0


class BatchView(BaseModel):
    """`GET /batches/{id}`, the 202 of `POST /batches` and the `data` of `batch.completed`."""

    batch_id: str
    status: BatchStatus
    request_counts: RequestCounts
    created_at: datetime
    cancel_requested_at: datetime | None = None
    finished_at: datetime | None = None
    status_url: str
    results_url: str


def _time(raw: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(raw), UTC) if raw else None


def decode_batch(batch_id: str, fields: Mapping[str, str]) -> BatchView:
    counts = {name: max(0, int(fields.get(name) or 0)) for name in COUNTED}
    return BatchView(
        batch_id=batch_id,
        status=BatchStatus(fields["status"]),
        request_counts=RequestCounts(total=int(fields["total"]), **counts),
        created_at=datetime.fromtimestamp(float(fields["created_at"]), UTC),
        cancel_requested_at=_time(fields.get("cancel_requested_at")),
        finished_at=_time(fields.get("finished_at")),
        status_url=f"/batches/{batch_id}",
        results_url=f"/batches/{batch_id}/results",
    )
