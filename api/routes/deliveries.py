"""`/tasks/{task_id}/deliveries`: a task's webhook attempts, and re-sending its latest event.

Owner-scoped like the task itself: another caller's task is a 404 here too.
"""

from __future__ import annotations

import json
import time
from typing import cast

from fastapi import APIRouter

from api.deps import OwnerDep, StoreDep
from api.openapi import ERROR_RESPONSES
from api.routes.tasks import TaskId
from api.store import ApiStore
from shared.errors import NoWebhookEvent
from shared.redis_state.keys import event_key, log_key, task_key
from shared.webhooks import Deliveries, DeliveryAttempt

router = APIRouter(prefix="/tasks", tags=["webhooks"])


async def _latest_event(store: ApiStore, task_id: str, owner: str) -> str | None:
    await store.read_and_settle(task_id, owner)  # 404 unless the caller owns the task
    return cast(str | None, await store.redis.hget(task_key(task_id), "webhook_event"))


async def _deliveries(store: ApiStore, task_id: str, event_id: str | None) -> Deliveries:
    state: str | None = None
    if event_id is not None:
        state = cast(str | None, await store.redis.hget(event_key(event_id), "state"))
    logged = cast(list[str], await store.redis.lrange(log_key(task_id), 0, -1))
    return Deliveries(
        task_id=task_id,
        webhook_id=event_id,
        state=state,
        attempts=[DeliveryAttempt.model_validate(json.loads(line)) for line in logged],
    )


@router.get("/{task_id}/deliveries", response_model=Deliveries, responses=ERROR_RESPONSES)
async def list_deliveries(task_id: TaskId, store: StoreDep, owner: OwnerDep) -> Deliveries:
    """Every attempt to deliver the task's webhook events: event, attempt, time, HTTP status or
    error, duration and the start of the receiver's answer."""
    return await _deliveries(store, task_id, await _latest_event(store, task_id, owner))


@router.post(
    "/{task_id}/deliveries/retry",
    response_model=Deliveries,
    status_code=202,
    responses=ERROR_RESPONSES,
)
async def retry_delivery(task_id: TaskId, store: StoreDep, owner: OwnerDep) -> Deliveries:
    """Send the task's latest webhook event again now (same webhook-id), with a fresh budget of
    WEBHOOK_MAX_ATTEMPTS; 409 when the task has no event."""
    event_id = await _latest_event(store, task_id, owner)
    retried = 0
    if event_id is not None:
        retried = await store.retry_event(event_id, now=time.time())
    if not retried:
        raise NoWebhookEvent(
            f"task {task_id} has no webhook event to send: it has no webhook, no subscribed "
            "event happened yet, or the event expired"
        )
    return await _deliveries(store, task_id, event_id)
