"""The console's actions (POST): sign in, sign out, retry a task, cancel a task, cancel a batch.

Each is a plain HTML form: it works with scripts off, and after it the browser is sent (303) to
the page that shows the outcome, so a reload does not repeat it. Every form carries the
session's CSRF token, checked before anything else (auth.py check_csrf: 403 with a page saying
what to do). The actions go through the same code as the API's routes (api/retry.py
retry_task, ApiStore.cancel, BatchStore.cancel), on behalf of the task's owner: an operator
acts on any tenant's task, a tenant on its own only (another's is a 404, as in the API).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Response

from api.console.auth import Role, check_csrf, new_session, role_of_key
from api.console.csp import ConsoleRoute
from api.console.pages import safe_next
from api.console.visit import Visit, VisitDep
from api.deps import BatchStoreDep, ResourceId, StoreDep
from api.retry import retry_task
from shared.errors import BatchNotFound, TaskNotFound, Unauthorized
from shared.redis_state.keys import batch_key, task_key

router = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)

CsrfField = Annotated[str, Form(max_length=128)]


async def _task_owner(visit: Visit, store: StoreDep, task_id: str) -> str:
    """The owner to act for: the task's, if the viewer may see it; else 404."""
    owner = await store.redis.hget(task_key(task_id), "owner")
    if owner is None or not visit.viewer.sees(str(owner)):
        raise TaskNotFound(f"no task {task_id!r}: it was never submitted or has expired")
    return str(owner)


@router.post("/signin")
async def sign_in(
    visit: VisitDep,
    csrf: CsrfField = "",
    key: Annotated[str, Form(max_length=4096)] = "",
    next_url: Annotated[str, Form(alias="next", max_length=512)] = "",
) -> Response:
    """Trade a key for a session (a new nonce: the one it came with is dropped)."""
    check_csrf(visit.settings, visit.viewer, csrf)
    target = safe_next(next_url)
    try:
        role, owner = role_of_key(visit.settings, key.strip())
    except Unauthorized:
        context = {"page": "sign-in", "next": target, "problem": "That key is not valid."}
        return visit.page("sign_in.html", context, status=401)
    visit.replace(*new_session(visit.settings, role, owner))
    return visit.redirect(target if role is Role.operator else "/console/tasks")


@router.post("/signout")
async def sign_out(visit: VisitDep, csrf: CsrfField = "") -> Response:
    check_csrf(visit.settings, visit.viewer, csrf)
    visit.replace(*new_session(visit.settings, Role.anonymous, ""))
    return visit.redirect("/console/signin")


@router.post("/tasks/{task_id}/retry")
async def retry(
    task_id: ResourceId, visit: VisitDep, store: StoreDep, csrf: CsrfField = ""
) -> Response:
    """POST /tasks/{id}/retry's logic; then the new task's page (or the one made before)."""
    check_csrf(visit.settings, visit.viewer, csrf)
    owner = await _task_owner(visit, store, task_id)
    retried = await retry_task(store, visit.settings, task_id, owner)
    return visit.redirect(f"/console/tasks/{retried.view.task_id}")


@router.post("/tasks/{task_id}/cancel")
async def cancel_task(
    task_id: ResourceId, visit: VisitDep, store: StoreDep, csrf: CsrfField = ""
) -> Response:
    check_csrf(visit.settings, visit.viewer, csrf)
    owner = await _task_owner(visit, store, task_id)
    await store.cancel(task_id, owner)
    return visit.redirect(f"/console/tasks/{task_id}")


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(
    batch_id: ResourceId, visit: VisitDep, batch_store: BatchStoreDep, csrf: CsrfField = ""
) -> Response:
    check_csrf(visit.settings, visit.viewer, csrf)
    owner = await batch_store.redis.hget(batch_key(batch_id), "owner")
    if owner is None or not visit.viewer.sees(str(owner)):
        raise BatchNotFound(f"no batch {batch_id!r}: it was never submitted or has expired")
    await batch_store.cancel(batch_id, str(owner))
    return visit.redirect("/console/batches")
