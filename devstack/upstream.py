"""A stand-in model server that holds any number of calls: each prediction waits `UPSTREAM_DELAY`
seconds (no CPU), then echoes its JSON body, as a TorchServe would.

TorchServe cannot hold hundreds of calls at once on two cores (a Python worker per call); an LLM
server can, and that is the load `make bench`'s long-calls scenario and the fault test of a worker
killed with hundreds of calls in flight are about. `GET /stats` says how many calls are in flight,
the most at once and how many ended; `GET /calls` how often each input `id` was received (how a
test counts "ran twice"). Run as `uvicorn devstack.upstream:create_app --factory`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

DELAY_ENV = "UPSTREAM_DELAY"


class Calls:
    """In flight now, the most at once, and how many ended since the last reset."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.ended = 0
        self.ids: Counter[str] = Counter()

    def as_dict(self) -> dict[str, int]:
        return {"in_flight": self.in_flight, "peak": self.peak, "ended": self.ended}


def create_app() -> Starlette:
    delay = float(os.environ.get(DELAY_ENV, "5"))
    calls = Calls()

    async def predict(request: Request) -> Response:
        body = await request.body()
        calls.ids[_id_of(body)] += 1
        calls.in_flight += 1
        calls.peak = max(calls.peak, calls.in_flight)
        try:
            await asyncio.sleep(delay)
        finally:
            calls.in_flight -= 1
            calls.ended += 1
        return Response(body or b"{}", media_type="application/json")

    async def stats(_: Request) -> JSONResponse:
        return JSONResponse(calls.as_dict())

    async def received(_: Request) -> JSONResponse:
        return JSONResponse(dict(calls.ids))

    async def reset(_: Request) -> JSONResponse:
        calls.peak, calls.ended = calls.in_flight, 0
        return JSONResponse(calls.as_dict())

    async def health(_: Request) -> Response:
        return Response("ok")

    return Starlette(
        routes=[
            Route("/predictions/{model}", predict, methods=["POST"]),
            Route("/predictions/{model}/{version}", predict, methods=["POST"]),
            Route("/stats", stats),
            Route("/calls", received),
            Route("/stats/reset", reset, methods=["POST"]),
            Route("/health", health),
            Route("/ping", health),
        ]
    )


def _id_of(body: bytes) -> str:
    """The body's `id` field when it is a JSON object with one, else ''."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return ""
    return str(parsed.get("id", "")) if isinstance(parsed, dict) else ""
