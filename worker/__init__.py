"""Celery workers: take prediction tasks off Redis, call their model servers, store the outcome."""

from worker.backends import Caller
from worker.store import StartVerdict, WorkerStore

__all__ = [
    "Caller",
    "StartVerdict",
    "WorkerStore",
]
