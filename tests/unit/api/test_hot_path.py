"""The API's lean hot path: POST /dispatch_model without FastAPI's dependency solving, documented
as a route declaring the dependencies would be, and the start-up heap kept out of the garbage
collector's walks."""

from __future__ import annotations

import gc

import pytest
from fastapi import FastAPI, Request, Response

from api.deps import DirectRoute, OwnerDep, WaitDep
from api.main import create_app
from shared.heap import freeze_startup_heap
from shared.settings import Settings


def test_dispatch_documents_the_parameters_it_reads_itself() -> None:
    app = create_app(Settings(_env_file=None))
    operation = app.openapi()["paths"]["/dispatch_model"]["post"]
    names = [(p["in"], p["name"]) for p in operation["parameters"]]
    # What FastAPI generated from the dependencies first, then the forms' own parameters.
    assert names[:3] == [("query", "wait"), ("header", "prefer"), ("header", "Idempotency-Key")]
    assert ("query", "model_name") in names
    # Exactly what FastAPI documents for a route that declares the dependencies.
    declared = FastAPI()

    @declared.post("/dispatch_model")
    async def dispatch(_: OwnerDep, __: WaitDep) -> None:
        return None

    expected = declared.openapi()["paths"]["/dispatch_model"]["post"]["parameters"]
    assert operation["parameters"][:2] == expected


def test_a_direct_route_takes_the_request_alone() -> None:
    app = FastAPI()

    async def fine(http: Request) -> Response:
        return Response(b"ok")

    async def declared(http: Request, wait: float | None = None) -> Response:
        return Response(b"no")

    app.router.add_api_route("/fine", fine, methods=["POST"], route_class_override=DirectRoute)
    assert any(isinstance(route, DirectRoute) for route in app.routes)
    with pytest.raises(TypeError, match="takes the Request and nothing else"):
        app.router.add_api_route(
            "/declared", declared, methods=["POST"], route_class_override=DirectRoute
        )


def test_freezing_keeps_collecting_what_comes_later() -> None:
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    collected: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        collected.append(info.get("collected", 0))

    gc.callbacks.append(count)
    try:
        frozen = freeze_startup_heap()
        assert frozen > 1000  # this interpreter's modules, classes and functions at least
        collected.clear()
        Cycle()  # garbage only the cyclic collector can free
        gc.collect()
        assert sum(collected) >= 1
    finally:
        gc.callbacks.remove(count)
        gc.unfreeze()
