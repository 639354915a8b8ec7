"""Celery workers: take prediction tasks off Redis, call TorchServe, store the outcome."""

from worker.store import StartVerdict, WorkerStore
from worker.torchserve import TorchServeClient, error_for_response, parse_body

__all__ = [
    "StartVerdict",
    "TorchServeClient",
    "WorkerStore",
    "error_for_response",
    "parse_body",
]
