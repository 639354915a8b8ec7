"""Dependencies every route shares, declared once as `Annotated` aliases.

All are `async def` although none awaits: FastAPI runs plain `def` dependencies in a threadpool,
and those hops were a quarter of the API's CPU per request (see docs/BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Query, Request

from api.auth import authenticate
from api.preferences import WaitPreference, wait_preference
from api.store import ApiStore
from api.waiting import ResultWaiter
from shared.settings import Settings


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _store(request: Request) -> ApiStore:
    store: ApiStore = request.app.state.store
    return store


async def _waiter(request: Request) -> ResultWaiter:
    waiter: ResultWaiter = request.app.state.waiter
    return waiter


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[ApiStore, Depends(_store)]
WaiterDep = Annotated[ResultWaiter, Depends(_waiter)]


async def _owner(
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    x_api_key: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> str:
    return authenticate(settings, authorization, x_api_key)


OwnerDep = Annotated[str, Depends(_owner)]


async def _wait(
    settings: SettingsDep,
    prefer: Annotated[
        str | None,
        Header(description="RFC 7240: `respond-async` for 202 at once, `wait=N` to block N s."),
    ] = None,
    wait: Annotated[
        float | None,
        Query(ge=0, le=86_400, description="Seconds to wait; overrides `Prefer`. 0 = async."),
    ] = None,
) -> WaitPreference:
    return wait_preference(prefer, wait, settings)


WaitDep = Annotated[WaitPreference, Depends(_wait)]
