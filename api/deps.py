"""Dependencies every route shares, declared once as `Annotated` aliases: the way routes declare
what they need.

All are `async def` although none awaits: FastAPI runs plain `def` dependencies in a threadpool,
one thread hop per dependency per request.

The one exception is `POST /dispatch_model`, the hot path: a `DirectRoute`, whose endpoint takes
the `Request` and calls `resolve`, which reads the same values straight from the request (same
headers, same `?wait=` validation and 422 message, same 401 first). FastAPI's dependency solving
and request handler are skipped; its exception handlers, middleware and schema are not: the route
lists `DIRECT_DEPENDENCIES`, which FastAPI documents and a DirectRoute never runs. Why: measured
on the real API and redis-server, a submit through the aliases costs the API process markedly
more CPU than through the DirectRoute (the figures are in docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, cast

from fastapi import Depends, Header, Path, Query, Request, Response
from fastapi.dependencies.utils import get_dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import Field, TypeAdapter, ValidationError

from api.auth import authenticate
from api.backend_probe import BackendProbe
from api.batch_store import BatchStore
from api.console.auth import operator_of_headers
from api.preferences import WaitPreference, wait_preference
from api.store import ApiStore
from api.waiting import ResultWaiter
from shared.redis_state.stream_reader import StreamHub
from shared.settings import Settings

T = TypeVar("T")
MAX_WAIT_QUERY = 86_400
# A task's or a batch's id in a path (uuid4, or `<batch id>-<index>` for a batch's items).
ResourceId = Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9\-]+$")]
WAIT_DESCRIPTION = "Seconds to wait; overrides `Prefer`. 0 = async."
PREFER_DESCRIPTION = "RFC 7240: `respond-async` for 202 at once, `wait=N` to block N s."


def _app_state(name: str, kind: type[T]) -> Callable[[Request], Coroutine[Any, Any, T]]:
    """A dependency that gives the `app.state.<name>` the app was built with, as a `kind`."""

    async def dependency(request: Request) -> T:
        return cast(T, getattr(request.app.state, name))

    dependency.__name__ = f"_{name}"
    return dependency


SettingsDep = Annotated[Settings, Depends(_app_state("settings", Settings))]
StoreDep = Annotated[ApiStore, Depends(_app_state("store", ApiStore))]
BatchStoreDep = Annotated[BatchStore, Depends(_app_state("batches", BatchStore))]
WaiterDep = Annotated[ResultWaiter, Depends(_app_state("waiter", ResultWaiter))]
# The process's one reader of task streams (shared/redis_state/stream_reader.py).
HubDep = Annotated[StreamHub, Depends(_app_state("hub", StreamHub))]
# The process's cache of backend health (api/backend_probe.py), shared by /ready and /status.
ProbeDep = Annotated[BackendProbe, Depends(_app_state("probe", BackendProbe))]


async def _owner(
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    x_api_key: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> str:
    return authenticate(settings, authorization, x_api_key)


OwnerDep = Annotated[str, Depends(_owner)]


async def _operator(
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    x_api_key: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> str:
    return operator_of_headers(settings, authorization, x_api_key)


# An operator key (OPERATOR_API_KEYS) when keys are configured: 401 without one, 403 a tenant's.
OperatorDep = Annotated[str, Depends(_operator)]


async def _wait(
    settings: SettingsDep,
    prefer: Annotated[
        str | None,
        Header(description=PREFER_DESCRIPTION),
    ] = None,
    wait: Annotated[
        float | None,
        Query(ge=0, le=MAX_WAIT_QUERY, description=WAIT_DESCRIPTION),
    ] = None,
) -> WaitPreference:
    return wait_preference(prefer, wait, settings)


WaitDep = Annotated[WaitPreference, Depends(_wait)]


LONG_POLL_QUERY = Query(
    ge=0, le=MAX_WAIT_QUERY, description="Long-poll: answer once ended or after N s."
)


async def _long_poll(settings: SettingsDep, wait: Annotated[float, LONG_POLL_QUERY] = 0) -> float:
    return min(wait, settings.dispatch_max_wait)


# How long a read of a task or a batch may wait for it to end: `?wait=N`, at most DISPATCH_MAX_WAIT.
LongPollDep = Annotated[float, Depends(_long_poll)]
# What `resolve` reads, for the schema of a DirectRoute (which lists them and never runs them).
DIRECT_DEPENDENCIES = [Depends(_owner), Depends(_wait)]


# --- the hot path without FastAPI's dependency solving ----------------------------------------

_WAIT_QUERY: TypeAdapter[float] = TypeAdapter(
    Annotated[float, Field(ge=0, le=MAX_WAIT_QUERY)]  # what Query(ge=0, le=...) validates
)


@dataclass(frozen=True, slots=True)
class Resolved:
    """What `SettingsDep`, `StoreDep`, `WaiterDep`, `OwnerDep` and `WaitDep` give a route."""

    settings: Settings
    store: ApiStore
    waiter: ResultWaiter
    owner: str
    preference: WaitPreference


def _wait_query(http: Request) -> float | None:
    if not http.scope.get("query_string"):
        return None
    raw = http.query_params.get("wait")
    if raw is None:
        return None
    try:
        return _WAIT_QUERY.validate_python(raw)
    except ValidationError as error:
        errors = error.errors(include_url=False, include_context=False)
        raise RequestValidationError([{**e, "loc": ("query", "wait")} for e in errors]) from None


def resolve(http: Request) -> Resolved:
    """The shared dependencies of a request, in FastAPI's order (a 401 before a bad `?wait=`)."""
    state = http.app.state
    settings: Settings = state.settings
    headers = http.headers
    owner = authenticate(settings, headers.get("authorization"), headers.get("x-api-key"))
    preference = wait_preference(headers.get("prefer"), _wait_query(http), settings)
    return Resolved(settings, state.store, state.waiter, owner, preference)


class DirectRoute(APIRoute):
    """A route whose endpoint takes the `Request` alone, returns a `Response`, and resolves its
    dependencies itself (`resolve`): FastAPI's request handler (dependency solving, parameter
    parsing, the endpoint's exit stacks) is skipped, the rest is FastAPI's own (exception
    handlers, middleware, the schema, including the route's `dependencies`, documented only)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        dependant = get_dependant(path=self.path_format, call=endpoint)  # the route's are docs
        declared = (
            dependant.dependencies,
            dependant.path_params,
            dependant.query_params,
            dependant.header_params,
            dependant.cookie_params,
            dependant.body_params,
        )
        if any(declared) or dependant.request_param_name is None:
            raise TypeError(f"{path}: a DirectRoute's endpoint takes the Request and nothing else")

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler: Callable[[Request], Coroutine[Any, Any, Response]] = self.endpoint
        return handler
