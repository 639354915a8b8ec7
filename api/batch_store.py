"""The API's side of batches (shared/batches.py): create in one transaction, read, cancel, results.

Creating 10,000 items is one MULTI/EXEC: CREATE (depth checks per class, the batch hash, the
Idempotency-Key) followed by ADD_ITEMS scripts of ITEMS_PER_SCRIPT items each, so Redis sees a
handful of commands instead of 30,000 and the batch appears whole or not at all. The per-item
work left in Python (the call, its Celery message) is what `BatchStore.create` spends its time
on; issue 12 can put several items into one message here.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import Any, cast

import redis.asyncio as aioredis

from api.batch_inputs import BatchInput, BatchItem
from api.idempotency import KEY_PREFIX, IdempotencyClaim, Replay
from api.store import ORPHAN_MARGIN, _write
from shared import batches, records
from shared.batches import BatchStatus, BatchView, decode_batch, item_task_id
from shared.celery_app import encode_messages
from shared.errors import BatchFinished, BatchNotFound, QueueFull, TaskCanceled
from shared.models import PredictionCall
from shared.priorities import queue_of
from shared.queue_depth import queued_key
from shared.settings import Settings

# The call dicts built by hand in BatchStore._item_args must stay PredictionCall's fields.
CALL_FIELDS = (
    "origin", "model_name", "model_version", "body", "payload", "deadline", "submitted_at",
    "priority", "token", "username", "password",
)  # fmt: skip
assert set(CALL_FIELDS) == set(PredictionCall.model_fields), "update BatchStore._item_args"

# Items per ADD_ITEMS / CANCEL_ITEMS call: big enough to keep the calls few, small enough that no
# one script holds Redis for more than a few milliseconds between other clients' commands.
ITEMS_PER_SCRIPT = 500
# Items read per round trip when streaming results.
RESULTS_PER_READ = 500
RESULT_FIELDS = ("status", "custom_id", "result", "error")


def new_batch_id() -> str:
    return str(uuid.uuid4())


class BatchStore:
    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.redis = client
        self._settings = settings
        self._create = client.register_script(batches.CREATE)
        self._add = client.register_script(batches.ADD_ITEMS)
        self._mark = client.register_script(batches.MARK_CANCELING)
        self._cancel = client.register_script(records.CANCEL_ITEMS)

    async def create(
        self, batch: BatchInput, owner: str, idempotency: IdempotencyClaim | None
    ) -> BatchView:
        """Record and enqueue every item, or raise QueueFull / Replay having written nothing."""
        batch_id = new_batch_id()
        now = time.time()
        settings = self._settings
        per_queue = Counter(queue_of(item.priority) for item in batch.items)
        longest = max(self._timeout(item) for item in batch.items)
        # The batch outlives its last item's bounds, then is kept RESULT_TTL like a task.
        ttl = int(settings.result_ttl + longest + settings.visibility_timeout + ORPHAN_MARGIN)
        fields: dict[str, Any] = {
            "status": BatchStatus.in_progress.value,
            "total": len(batch.items),
            "queued": len(batch.items),
            "created_at": now,
            "owner": owner,
            "ttl": settings.result_ttl,
        }
        if batch.webhook and batch.webhook_events:
            fields["webhook"] = batch.webhook
            fields["webhook_events"] = ",".join(batch.webhook_events)
        key = batches.batch_key(batch_id)
        queues = list(per_queue)
        head = [
            settings.max_queue_depth,
            idempotency.record(batch_id) if idempotency else "",
            settings.idempotency_ttl,
            ttl,
            *(per_queue[queue] for queue in queues),
            *(item for pair in fields.items() for item in pair),
        ]
        async with self.redis.pipeline(transaction=True) as pipe:
            await self._create(
                keys=[
                    key,
                    idempotency.redis_key if idempotency else key,
                    *(queued_key(queue) for queue in queues),
                ],
                args=head,
                client=pipe,
            )
            common: list[Any] = [settings.result_ttl, now, owner, batch_id]
            for start in range(0, len(batch.items), ITEMS_PER_SCRIPT):
                chunk = batch.items[start : start + ITEMS_PER_SCRIPT]
                args = self._item_args(batch, batch_id, start, chunk, now)
                await self._add(keys=[key], args=[*common, *args], client=pipe)
            outcome = (await _write(pipe.execute, "nothing was enqueued"))[0]
        if isinstance(outcome, str) and idempotency is not None:
            raise Replay(idempotency.held_task(outcome))
        if not outcome:
            full = ", ".join(sorted(queues))
            raise QueueFull(
                f"the batch's {len(batch.items)} items would take {full} past MAX_QUEUE_DEPTH "
                f"({settings.max_queue_depth}); retry later or send a smaller batch"
            )
        return decode_batch(batch_id, {k: str(v) for k, v in fields.items()})

    def _timeout(self, item: BatchItem) -> float:
        return item.request.timeout or self._settings.dispatch_default_timeout

    def _item_args(
        self, batch: BatchInput, batch_id: str, start: int, chunk: list[BatchItem], now: float
    ) -> list[Any]:
        """ADD_ITEMS' arguments after the common ones: the items' JSON, messages, payloads."""
        items: list[Any] = []
        calls: dict[str, list[tuple[str, str]]] = defaultdict(list)
        payloads: list[bytes | bytearray] = []
        events = ",".join(batch.task_events)
        for index, item in enumerate(chunk, start):
            task_id = item_task_id(batch_id, index)
            request, queue = item.request, queue_of(item.priority)
            deadline = now + self._timeout(item)
            ref, stored = item.payload.reference(task_id) if item.payload else (None, None)
            # PredictionCall's fields as a dict: a model per item costs more than the rest here.
            call = {
                "origin": item.origin,
                "model_name": request.model_name,
                "model_version": request.model_version,
                "body": request.torchserve_body() if item.payload is None else None,
                "payload": ref.model_dump() if ref is not None else None,
                "deadline": deadline,
                "submitted_at": now,
                "priority": item.priority.value,
                "token": request.token.get_secret_value() if request.token else None,
                "username": request.username,
                "password": request.password.get_secret_value() if request.password else None,
            }
            calls[queue].append((task_id, json.dumps(call)))
            fields = [
                "model_name", request.model_name,
                "model_version", request.model_version or "",
                "origin", item.origin,
                "deadline", repr(deadline),
                "custom_id", item.custom_id,
                "priority", item.priority.value,
            ]  # fmt: skip
            if request.webhook:
                fields += ["webhook", request.webhook]
                fields += ["webhook_events", ",".join(request.webhook_event_types())]
            elif events and batch.webhook:  # the batch's task.* events, for every item
                fields += ["webhook", batch.webhook, "webhook_events", events]
            if stored is not None:
                payloads.append(stored)
            items.append([index, queue, fields, len(payloads) if stored is not None else 0])
        per_message = self._settings.message_max_tasks
        messages = {
            queue: encode_messages(c, queue=queue, per_message=per_message)
            for queue, c in calls.items()
        }
        return [
            json.dumps(items),
            json.dumps([queue for queue, queued in messages.items() for _ in queued]),
            *(message for queued in messages.values() for message in queued),
            *payloads,
        ]

    async def get(self, batch_id: str, owner: str) -> BatchView:
        """The batch as its owner may see it; 404 for unknown ids and other owners' batches."""
        fields = cast(dict[str, str], await self.redis.hgetall(batches.batch_key(batch_id)))
        if not fields or fields.get("owner", "") != owner:
            raise BatchNotFound(f"no batch {batch_id!r}: it was never submitted or has expired")
        return decode_batch(batch_id, fields)

    async def cancel(self, batch_id: str, owner: str) -> BatchView:
        """Cancel every queued item (they never reach TorchServe); running ones finish."""
        view = await self.get(batch_id, owner)
        key = batches.batch_key(batch_id)
        before = await _write(
            self._mark, "the batch was not canceled", keys=[key], args=[time.time()]
        )
        if before in (BatchStatus.completed.value, BatchStatus.canceled.value):
            raise BatchFinished(f"batch {batch_id} already ended as {before}: nothing to cancel")
        error = TaskCanceled("the task's batch was canceled before a worker started it")
        body = error.body().model_dump_json()
        total = view.request_counts.total
        async with self.redis.pipeline(transaction=False) as pipe:
            for start in range(0, total, ITEMS_PER_SCRIPT):
                last = min(start + ITEMS_PER_SCRIPT, total) - 1
                args: list[Any] = [
                    time.time(),
                    self._settings.result_ttl,
                    records.FINISHED_CHANNEL,
                    body,
                    batch_id,
                    start,
                    last,
                ]
                await self._cancel(keys=[], args=args, client=pipe)
            await _write(pipe.execute, "some queued items may not have been canceled")
        return await self.get(batch_id, owner)

    async def results(self, view: BatchView) -> AsyncIterator[bytes]:
        """One JSON line per item, in input order, read RESULTS_PER_READ items per round trip.

        `prediction_value` and `error` are spliced in as the worker stored them (JSON already),
        so a line costs no parse and no re-serialization of the prediction.
        """
        total = view.request_counts.total
        for start in range(0, total, RESULTS_PER_READ):
            indices = range(start, min(start + RESULTS_PER_READ, total))
            async with self.redis.pipeline(transaction=False) as pipe:
                for index in indices:
                    pipe.hmget(records.task_key(item_task_id(view.batch_id, index)), RESULT_FIELDS)
                rows = await pipe.execute()
            lines = []
            for index, (status, custom_id, result, error) in zip(indices, rows, strict=True):
                task_id = item_task_id(view.batch_id, index)
                lines.append(_line(task_id, status, custom_id, result, error))
            yield "".join(lines).encode()


def _line(
    task_id: str, status: str | None, custom_id: str | None, result: str | None, error: str | None
) -> str:
    head = f'{{"custom_id":{json.dumps(custom_id)},"task_id":"{task_id}"'
    if status is None:  # its record expired (RESULT_TTL) or was evicted
        gone = '{"status":404,"msg":"the item\'s record has expired","code":"task_not_found"}'
        return f'{head},"status":"expired","error":{gone}}}\n'
    if result is not None and status == "succeeded":
        return f'{head},"status":"succeeded","prediction_value":{result}}}\n'
    if error is not None:
        return f'{head},"status":"{status}","error":{error}}}\n'
    return f'{head},"status":"{status}"}}\n'


def batch_idempotency(key: str, owner: str, fingerprint: str) -> IdempotencyClaim:
    """Idempotency-Key on POST /batches: per caller, apart from the same key on a dispatch."""
    scoped = hashlib.sha256(f"{owner}\0batch\0{key}".encode()).hexdigest()
    return IdempotencyClaim(KEY_PREFIX + "batch:" + scoped, fingerprint)
