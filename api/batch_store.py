"""The API's side of batches (shared/redis_state/batch.py): create in one transaction, read,
cancel, results.

Creating 10,000 items is one MULTI/EXEC: batch_create (depth checks per class, the batch hash,
the Idempotency-Key) followed by batch_add_items scripts of ITEMS_PER_SCRIPT items each, so Redis
sees a handful of commands instead of 30,000 and the batch appears whole or not at all; with
replicas to wait for, WAIT follows the EXEC on its connection (shared/replica_wait.py). The
per-item work left in Python (the call, its Celery message) is what `BatchStore.create` spends
its time on.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from api.batch_inputs import BatchInput, BatchItem
from api.idempotency import IdempotencyClaim, Replay
from api.store import ORPHAN_MARGIN, _write
from shared.celery_app import encode_messages
from shared.errors import BatchFinished, BatchNotFound, QueueFull, TaskCanceled
from shared.models import call_fields
from shared.priorities import queue_of
from shared.redis_state.batch import (
    BatchStatus,
    BatchView,
    NewBatch,
    decode_batch,
    item_task_id,
)
from shared.redis_state.batch_scripts import (
    AddBatchItems,
    BatchItemRecord,
    CancelBatchItems,
    CreateBatch,
    MarkBatchCanceling,
)
from shared.redis_state.keys import batch_idempotency_key, batch_key, task_key
from shared.redis_state.record import NewTask, as_mapping, recorded_operation
from shared.replica_wait import ReplicaWait, replicated_transaction
from shared.settings import Settings

# Items per batch_add_items / batch_cancel_items call: big enough to keep the calls few, small
# enough that no one script holds Redis for more than a few milliseconds between other clients'
# commands.
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
        self._create = CreateBatch(client)
        self._add = AddBatchItems(client)
        self._mark = MarkBatchCanceling(client)
        self._cancel = CancelBatchItems(client)
        self._replicas = ReplicaWait.of(client, settings)

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
        fields = NewBatch(
            total=len(batch.items),
            created_at=now,
            owner=owner,
            ttl=settings.result_ttl,
            webhook=batch.webhook,
            webhook_events=batch.webhook_events,
        ).fields()

        async def queue(pipe: Pipeline) -> None:
            await self._create(
                pipe,
                batch_id,
                fields=fields,
                per_queue=per_queue,
                ttl=ttl,
                max_depth=settings.max_queue_depth,
                idempotency_key=idempotency.redis_key if idempotency else "",
                idempotency_record=idempotency.record(batch_id) if idempotency else "",
                idempotency_ttl=settings.idempotency_ttl,
            )
            for start in range(0, len(batch.items), ITEMS_PER_SCRIPT):
                chunk = batch.items[start : start + ITEMS_PER_SCRIPT]
                items, messages = self._items(batch, batch_id, start, chunk, now)
                await self._add(
                    pipe,
                    batch_id,
                    items=items,
                    messages=messages,
                    ttl=settings.result_ttl,
                    now=now,
                    owner=owner,
                )

        # One MULTI/EXEC; with replicas to wait for, answered once they hold it.
        written = replicated_transaction(self.redis, self._replicas, queue)
        outcome = (await _write(written, "nothing was enqueued"))[0]
        if isinstance(outcome, str) and idempotency is not None:
            raise Replay(idempotency.held_task(outcome))
        if not outcome:
            full = ", ".join(sorted(per_queue))
            raise QueueFull(
                f"the batch's {len(batch.items)} items would take {full} past MAX_QUEUE_DEPTH "
                f"({settings.max_queue_depth}); retry later or send a smaller batch"
            )
        return decode_batch(batch_id, as_mapping(fields))

    def _timeout(self, item: BatchItem) -> float:
        return item.request.timeout or self._settings.dispatch_default_timeout

    def _items(
        self, batch: BatchInput, batch_id: str, start: int, chunk: list[BatchItem], now: float
    ) -> tuple[list[BatchItemRecord], list[tuple[str, str]]]:
        """One batch_add_items call's items and their (queue, message) pairs."""
        items: list[BatchItemRecord] = []
        calls: dict[str, list[tuple[str, str]]] = defaultdict(list)
        events = batch.task_events
        for index, item in enumerate(chunk, start):
            task_id = item_task_id(batch_id, index)
            request, queue = item.request, queue_of(item.priority)
            deadline = now + self._timeout(item)
            ref, stored = item.payload.reference(task_id) if item.payload else (None, None)
            call = call_fields(request, item.target, deadline, now, item.priority, ref)
            calls[queue].append((task_id, json.dumps(call)))
            webhook, webhook_events = None, events
            if request.webhook:
                webhook, webhook_events = request.webhook, request.webhook_event_types()
            elif events and batch.webhook:  # the batch's task.* events, for every item
                webhook = batch.webhook
            fields = NewTask(
                model_name=request.model_name,
                model_version=request.model_version,
                origin=item.target.origin,
                backend=item.target.backend,
                operation=recorded_operation(item.target),
                deadline=deadline,
                priority=item.priority,
                webhook=webhook,
                webhook_events=webhook_events,
                custom_id=item.custom_id,
                stream=request.stream,
                retry_keep=self._settings.retry_keep_seconds,
                credentials=request.has_credentials,
            ).item_fields()
            items.append(BatchItemRecord(index, queue, fields, stored))
        per_message = self._settings.message_max_tasks
        messages = [
            (queue, message)
            for queue, c in calls.items()
            for message in encode_messages(c, queue=queue, per_message=per_message)
        ]
        return items, messages

    async def get(self, batch_id: str, owner: str) -> BatchView:
        """The batch as its owner may see it; 404 for unknown ids and other owners' batches."""
        fields = cast(dict[str, str], await self.redis.hgetall(batch_key(batch_id)))
        if not fields or fields.get("owner", "") != owner:
            raise BatchNotFound(f"no batch {batch_id!r}: it was never submitted or has expired")
        return decode_batch(batch_id, fields)

    async def cancel(self, batch_id: str, owner: str) -> BatchView:
        """Cancel every queued item (they never reach TorchServe); running ones finish."""
        view = await self.get(batch_id, owner)
        before = await _write(self._mark(batch_id, now=time.time()), "the batch was not canceled")
        if before in (BatchStatus.completed.value, BatchStatus.canceled.value):
            raise BatchFinished(f"batch {batch_id} already ended as {before}: nothing to cancel")
        error = TaskCanceled("the task's batch was canceled before a worker started it")
        body = error.body().model_dump_json()
        total = view.request_counts.total
        async with self.redis.pipeline(transaction=False) as pipe:
            for start in range(0, total, ITEMS_PER_SCRIPT):
                last = min(start + ITEMS_PER_SCRIPT, total) - 1
                await self._cancel(
                    pipe,
                    batch_id,
                    start,
                    last,
                    now=time.time(),
                    ttl=self._settings.result_ttl,
                    error=body,
                )
            await _write(pipe.execute(), "some queued items may not have been canceled")
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
                    pipe.hmget(task_key(item_task_id(view.batch_id, index)), RESULT_FIELDS)
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
    return IdempotencyClaim(batch_idempotency_key(scoped), fingerprint)
