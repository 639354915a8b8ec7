"""`GET /status`: the console's figures as JSON, for scripts, dashboards and the console's page.

The figures are global (every tenant's traffic, every worker), so with keys configured only an
operator key (OPERATOR_API_KEYS) may read them: a tenant key is a 403. What each figure means is
in api/status.py and docs/console.md.
"""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import OperatorDep, ProbeDep, SettingsDep, StoreDep
from api.openapi import ERROR_RESPONSES
from api.status import StatusView, collect

router = APIRouter(tags=["status"])


@router.get(
    "/status",
    response_model=StatusView,
    responses={
        401: ERROR_RESPONSES[401],
        403: {
            "model": ERROR_RESPONSES[401]["model"],
            "description": "a tenant key (DISPATCHER_API_KEYS): the figures need an operator key",
        },
        503: {"model": ERROR_RESPONSES[401]["model"], "description": "Redis unavailable"},
    },
    summary="Queues, throughput, latency, failures, workers, backends and batches in progress",
)
async def status(
    store: StoreDep, settings: SettingsDep, probe: ProbeDep, _: OperatorDep
) -> StatusView:
    """Per priority class: queued, age of the oldest queued task, in flight, submitted and
    finished per second (1 and 5 minutes), endings and failures by code, 429s and p50/p95/p99
    of queue wait, run time and end to end (5 minutes); a 15-minute chart; live and gone
    workers; each backend's health and run time; batches in progress. Read from the bounded
    figures in Redis, so every API process answers the same."""
    return await collect(store.redis, settings, probe)
