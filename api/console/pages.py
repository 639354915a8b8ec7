"""The console's pages (GET): overview, workers, backends, batches, tasks, a task, sign-in.

Every page is rendered whole on the server from one read of Redis (api/status.py collect, or the
task lists), so it shows everything with scripts off. The global pages (overview, workers,
backends) are an operator's: a tenant key gets a page saying so, not the figures, since they
describe every tenant's traffic. A tenant sees its own tasks and batches only: another tenant's
task is a 404 here as in the API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, cast
from urllib.parse import urlsplit

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse

from api.console import charts
from api.console.auth import NotOperator
from api.console.csp import ConsoleRoute
from api.console.task_list import LISTS, Filters, read_rows, select
from api.console.visit import SIGN_IN, Visit, VisitDep
from api.deps import ProbeDep, ResourceId, StoreDep
from api.errors import error_response
from api.status import BatchProgress, StatusView, batches, collect
from shared.errors import DispatchError, TaskNotFound
from shared.models import TaskStatus, TaskView
from shared.priorities import Priority
from shared.redis_state.keys import batch_key, event_key, log_key, task_key
from shared.webhooks import Deliveries, DeliveryAttempt

router = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)

STATIC = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}
STATIC_DIR = Path(__file__).parent / "static"
RETRYABLE = (TaskStatus.failed, TaskStatus.expired, TaskStatus.canceled)
# Request fields a task page lists (what the record keeps of the request; never the payload,
# the webhook's path and query, which may carry a token, or any credential).
REQUEST_FIELDS = (
    "model_name", "model_version", "backend", "operation", "origin", "priority", "deadline",
    "stream", "webhook_events", "batch", "custom_id", "reconciled",
)  # fmt: skip


class AssetNotFound(DispatchError):
    """A /console/static name that is not one of the vendored files."""

    status = 404
    code = "not_found"


def operator_only(visit: Visit, page: str) -> Response | None:
    """The sign-in redirect or the tenant's message for a global page; None for an operator."""
    if (redirect := visit.needs_sign_in()) is not None:
        return redirect
    if visit.viewer.operator:
        return None
    return visit.page("restricted.html", {"page": page}, status=403)


@router.get("")
async def overview(visit: VisitDep, store: StoreDep, probe: ProbeDep) -> Response:
    if (other := operator_only(visit, "overview")) is not None:
        return other
    status = await collect(store.redis, visit.settings, probe)
    return visit.page(
        "overview.html",
        {
            "page": "overview",
            "status": status,
            "throughput": charts.throughput(status.chart, status.bucket_seconds),
            "latency": charts.latency(status.chart),
        },
    )


@router.get("/workers")
async def workers(visit: VisitDep, store: StoreDep, probe: ProbeDep) -> Response:
    if (other := operator_only(visit, "workers")) is not None:
        return other
    status = await collect(store.redis, visit.settings, probe)
    return visit.page("workers.html", {"page": "workers", "status": status})


@router.get("/backends")
async def backends(visit: VisitDep, store: StoreDep, probe: ProbeDep) -> Response:
    if (other := operator_only(visit, "backends")) is not None:
        return other
    status = await collect(store.redis, visit.settings, probe)
    return visit.page("backends.html", {"page": "backends", "status": status})


@router.get("/status.json", response_model=StatusView)
async def status_json(visit: VisitDep, store: StoreDep, probe: ProbeDep) -> Response:
    """`GET /status` for the page's script: the same figures, with the session cookie (which
    the browser sends under /console only) instead of a key header."""
    if not visit.viewer.operator:
        refused = NotOperator("sign in to the console with an operator key (OPERATOR_API_KEYS)")
        return visit.finish(error_response(refused))
    status = await collect(store.redis, visit.settings, probe)
    return visit.finish(Response(status.model_dump_json(), media_type="application/json"))


async def visible_batches(visit: Visit, store: StoreDep) -> list[BatchProgress]:
    """The batches in progress the viewer may see: all, or a tenant's own."""
    found = await batches(store.redis)
    if visit.viewer.operator:
        return found
    async with store.redis.pipeline(transaction=False) as pipe:
        for batch in found:
            pipe.hget(batch_key(batch.batch_id), "owner")
        owners = await pipe.execute()
    return [b for b, owner in zip(found, owners, strict=True) if visit.viewer.sees(owner or "")]


@router.get("/batches")
async def batch_page(visit: VisitDep, store: StoreDep) -> Response:
    if (redirect := visit.needs_sign_in()) is not None:
        return redirect
    return visit.page(
        "batches.html", {"page": "batches", "batches": await visible_batches(visit, store)}
    )


@router.get("/tasks")
async def tasks(
    visit: VisitDep,
    store: StoreDep,
    which: Annotated[str, Query(alias="list", pattern="^(recent|failed)$")] = "recent",
    model: Annotated[str, Query(max_length=256)] = "",
    status: Annotated[str, Query(max_length=16)] = "",
    code: Annotated[str, Query(max_length=64)] = "",
    priority: Annotated[str, Query(max_length=16)] = "",
    owner: Annotated[str, Query(max_length=64)] = "",
    page: Annotated[int, Query(ge=1, le=1000)] = 1,
) -> Response:
    """The newest tasks (`list=recent`) or failures (`list=failed`), filtered."""
    if (redirect := visit.needs_sign_in()) is not None:
        return redirect
    mine = None if visit.viewer.operator else visit.viewer.owner
    rows = await read_rows(store.redis, which, owner=mine)
    filters = Filters(model, status, code, priority, owner if mine is None else "")
    listed = select(rows, filters, page)
    return visit.page(
        "tasks.html",
        {
            "page": "tasks",
            "which": which,
            "lists": list(LISTS),
            "filters": filters,
            "listed": listed,
            "statuses": [s.value for s in TaskStatus],
            "priorities": [p.value for p in Priority],
            "retryable": RETRYABLE,
        },
    )


@dataclass(frozen=True, slots=True)
class TaskPage:
    view: TaskView
    owner: str
    request_fields: list[tuple[str, str]]
    webhook_origin: str | None
    deliveries: Deliveries
    starts: list[tuple[datetime, str]]  # each delivery that ran: when, on which worker


def delivery_log(logged: str | None) -> list[tuple[datetime, str]]:
    """The record's `starts` (task_start): one "<epoch> <worker>" line per delivery that ran."""
    starts = []
    for line in (logged or "").splitlines():
        at, _, worker = line.partition(" ")
        starts.append((datetime.fromtimestamp(float(at), UTC), worker))
    return starts


def _origin(url: str | None) -> str | None:
    """A webhook URL's scheme://host[:port]: its path and query may carry a token."""
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


async def read_task(visit: Visit, store: StoreDep, task_id: str) -> TaskPage:
    """A task as its page shows it; 404 for an unknown id or another tenant's task."""
    fields = cast(dict[str, str], await store.redis.hgetall(task_key(task_id)))
    owner = fields.get("owner", "")
    if not fields or not visit.viewer.sees(owner):
        raise TaskNotFound(f"no task {task_id!r}: it was never submitted or has expired")
    view = await store.read_and_settle(task_id, owner)  # ends an overdue one, as the API does
    event_id = fields.get("webhook_event")
    async with store.redis.pipeline(transaction=False) as pipe:
        pipe.hget(event_key(event_id or "-"), "state")
        pipe.lrange(log_key(task_id), 0, -1)
        state, logged = await pipe.execute()
    deliveries = Deliveries(
        task_id=task_id,
        webhook_id=event_id,
        state=state if event_id else None,
        attempts=[DeliveryAttempt.model_validate(json.loads(line)) for line in logged],
    )
    shown = [(name, fields[name]) for name in REQUEST_FIELDS if fields.get(name)]
    starts = delivery_log(fields.get("starts"))
    return TaskPage(view, owner, shown, _origin(fields.get("webhook")), deliveries, starts)


@router.get("/tasks/{task_id}")
async def task(visit: VisitDep, store: StoreDep, task_id: ResourceId) -> Response:
    if (redirect := visit.needs_sign_in()) is not None:
        return redirect
    found = await read_task(visit, store, task_id)
    return visit.page(
        "task.html",
        {"page": "tasks", "task": found, "retryable": RETRYABLE, "TaskStatus": TaskStatus},
    )


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a console path only (never another site)."""
    if target and target.startswith("/console") and "//" not in target and "\\" not in target:
        return target
    return "/console"


@router.get("/signin")
async def sign_in_page(
    visit: VisitDep, next_url: Annotated[str, Query(alias="next", max_length=512)] = ""
) -> Response:
    return visit.page(
        "sign_in.html", {"page": "sign-in", "next": safe_next(next_url), "problem": None}
    )


@router.get("/static/{name}")
async def static(name: str) -> Response:
    """The vendored assets: a fixed list, so no path from the URL reaches the file system."""
    if name not in STATIC:
        raise AssetNotFound(f"no console asset {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=STATIC[name])


__all__ = ["SIGN_IN", "router"]
