"""The peer's Celery app (Redis broker and Redis result backend) and its TorchServe task.

Configured the way tutorials do it: JSON, results in Redis, everything else Celery's defaults.
`celery -A bench.peer.worker worker -Q dispatch` runs it (devstack's CeleryWorker).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

import httpx
from celery import Celery

TASK_NAME = "peer.predict"
QUEUE = "dispatch"  # the queue devstack's CeleryWorker consumes

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
TORCHSERVE_URL = os.environ.get("TORCHSERVE_URL", "http://127.0.0.1:8080").rstrip("/")

app = Celery("peer", broker=REDIS_URL, backend=REDIS_URL, set_as_current=False)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)

_http = httpx.Client(trust_env=False, timeout=60)


@app.task(name=TASK_NAME)  # type: ignore[untyped-decorator]
def predict(model_name: str, body: Any) -> Any:
    """POST the body to TorchServe and return its JSON answer (the result backend stores it)."""
    response = _http.post(f"{TORCHSERVE_URL}/predictions/{quote(model_name, safe='')}", json=body)
    response.raise_for_status()
    return response.json()
