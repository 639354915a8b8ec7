"""`/health` (the process is up) and `/ready` (it can get predictions done)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.deps import OwnerDep
from api.openapi import ERROR_RESPONSES
from api.readiness import Readiness, check_readiness

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness only: answers without touching Redis or any model server."""
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=Readiness,
    responses={
        401: ERROR_RESPONSES[401],
        503: {"model": Readiness, "description": "not ready: `checks` says what is missing"},
    },
)
async def ready(request: Request, _: OwnerDep) -> JSONResponse:
    """200 when Redis, a live worker and the gating backends (READY_BACKENDS, else
    DEFAULT_BACKEND) are reachable; else 503 with the reasons. `backends` reports every
    configured backend's health, gating or not: a queue keeps accepting work for a backend
    that is briefly down (its tasks wait, or fail as their deadlines say). `redis` names the
    primary (host:port, on Sentinel the current one) and the replicas that acknowledge writes;
    when submits wait for replicas (REDIS_MIN_REPLICAS, 1 by default on Sentinel) and fewer
    acknowledge than they wait for, the `replicas` check says so and it is 503: every submit
    would answer 503 too (api/readiness.py says why a load balancer is told so)."""
    report = await check_readiness(request.app.state)
    return JSONResponse(report.model_dump(), status_code=200 if report.ready else 503)
