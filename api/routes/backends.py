"""`GET /backends`: the configured model servers, how each is doing, and the models it reports.

Discovery for clients and operators: which `backend` names a request may use, with which
operations, whether the server takes bytes, and what it serves. Every backend is asked at once,
each question with a short timeout and from a brief cache (api/backend_probe.py), so a backend
that hangs delays this by at most one timeout and a dashboard polling it costs the servers
little. A backend's token is never shown; its origin is (it is in the settings, not a secret).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from api.backend_probe import HEALTH_TTL, BackendProbe
from api.deps import OwnerDep, SettingsDep
from api.openapi import ERROR_RESPONSES
from shared.backends import Backend, Protocol

router = APIRouter(tags=["backends"])


class BackendInfo(BaseModel):
    """One configured backend."""

    name: str = Field(description="What a request's `backend` field names.")
    protocol: Protocol
    origin: str = Field(description="`scheme://host:port` the dispatcher calls.")
    default: bool = Field(description="Requests that name no backend go here (DEFAULT_BACKEND).")
    gates_readiness: bool = Field(description="Whether its health decides `/ready`.")
    operations: list[str] = Field(description="Its protocol's operations; the first is default.")
    health: str = Field(description='"ok", or why not.')
    takes_bytes: bool | None = Field(
        description="Whether raw bodies, multipart files and data URIs may go to it (OIP: the "
        "binary tensor data extension; null: its server could not be asked, then they are "
        "accepted and the call answers)."
    )
    models: list[str] | None = Field(
        description="The models it reports; null where the protocol cannot list them "
        "(TorchServe's inference API) or the listing failed (`models_error`)."
    )
    models_error: str | None = None


class Backends(BaseModel):
    backends: list[BackendInfo]


async def _info(
    probe: BackendProbe, backend: Backend, default: str, gating: set[str]
) -> BackendInfo:
    health, models = await asyncio.gather(
        probe.health(backend, max_age=HEALTH_TTL), probe.models(backend)
    )
    takes_bytes: bool | None = backend.protocol is Protocol.torchserve
    if backend.protocol is Protocol.oip:
        takes_bytes = (await probe.metadata(backend)).takes_bytes
    return BackendInfo(
        name=backend.name,
        protocol=backend.protocol,
        origin=backend.origin,
        default=backend.name == default,
        gates_readiness=backend.name in gating,
        operations=list(backend.operations),
        health=health,
        takes_bytes=takes_bytes,
        models=list(models.names) if models.names is not None else None,
        models_error=models.why,
    )


@router.get(
    "/backends",
    response_model=Backends,
    responses={401: ERROR_RESPONSES[401]},
    summary="The configured model servers: health, operations, models",
)
async def list_backends(request: Request, settings: SettingsDep, _: OwnerDep) -> Backends:
    """Every configured backend: name, protocol, origin (never its token), health, whether it
    is the default, its operations, and the models it reports where its protocol can list them
    (OIP `GET /v2/models` or `POST /v2/repository/index`, OpenAI `GET /v1/models`)."""
    probe: BackendProbe = request.app.state.probe
    gating = set(settings.ready_backends or [settings.default_backend])
    found = await asyncio.gather(
        *(
            _info(probe, backend, settings.default_backend, gating)
            for backend in settings.backend_map.values()
        )
    )
    return Backends(backends=list(found))
