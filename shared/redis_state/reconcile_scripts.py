"""Typed call of lua/task_reconcile.lua, the reconciler's one write (worker/reconciler.py).

Sync: the reconciler runs on a thread of its own in each worker, like the heartbeat.
"""

from __future__ import annotations

from shared.redis_state.keys import task_key
from shared.redis_state.loader import SyncWrapper, text


class ReconcileTask(SyncWrapper):
    """task_reconcile: pushes a fresh message for a task whose message was lost, unless its
    record moved on since the reconciler saw it (then nothing is written)."""

    name = "task_reconcile"

    def __call__(self, task_id: str, *, seen: str, live_since: float, message: str) -> str:
        """`seen`: "<status>:<deliveries>:<reconciled>" as found; `message`: one carrying this
        task alone. 'requeued', 'changed', 'live', a terminal status or 'missing'."""
        args: list[str | float] = [task_id, seen, live_since, message]
        return text(self._script(keys=[task_key(task_id)], args=args))
