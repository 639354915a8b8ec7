"""The peer's API: `uvicorn bench.peer.app:create_app --factory`.

A plain `def` endpoint, so FastAPI runs it in its threadpool, where it blocks on
`AsyncResult.get()`: the pattern most FastAPI + Celery projects start with.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from bench.peer.worker import TASK_NAME
from bench.peer.worker import app as celery_app

WAIT_SECONDS = 60


class PeerRequest(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    input: Any = None


def create_app() -> FastAPI:
    api = FastAPI(title="peer: FastAPI + Celery AsyncResult.get()")

    @api.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/dispatch_model")
    def dispatch_model(request: PeerRequest) -> dict[str, Any]:
        result = celery_app.send_task(TASK_NAME, args=[request.model_name, request.input])
        value = result.get(timeout=WAIT_SECONDS)
        return {"status": "succeeded", "prediction_value": value}

    return api
