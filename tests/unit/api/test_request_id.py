"""The X-Request-ID middleware on its own (no servers): validation, echo, errors, log binding,
and the Celery message headers built inside a request."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.request_id import MAX_LENGTH, RequestId
from shared.celery_app import REQUEST_ID_HEADER, encode_task_message
from shared.logs import current_request_id

SEEN: list[str | None] = []


async def ok(_: Request) -> Response:
    SEEN.append(current_request_id())
    return JSONResponse({"headers": json.loads(encode_task_message("t-1", {}))["headers"]})


async def crash(_: Request) -> Response:
    raise RuntimeError("boom")


def client() -> httpx.AsyncClient:
    app = Starlette(routes=[Route("/ok", ok), Route("/crash", crash)])
    app.add_middleware(RequestId)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def get(path: str, **headers: str) -> httpx.Response:
    async def run() -> httpx.Response:
        async with client() as http:
            return await http.get(path, headers=headers)

    return asyncio.run(run())


def test_a_valid_id_is_echoed_and_put_into_the_task_message() -> None:
    for value in ("abc", "x" * MAX_LENGTH, "a b ~!", "00-4bf92f3577b34da6a3ce929d0e0e4736"):
        response = get("/ok", **{"X-Request-ID": value})
        assert response.status_code == 200
        assert response.headers["x-request-id"] == value
        assert response.json()["headers"][REQUEST_ID_HEADER] == value
        assert SEEN[-1] == value


def test_without_one_an_id_is_generated_per_request() -> None:
    first, second = get("/ok"), get("/ok")
    ids = {first.headers["x-request-id"], second.headers["x-request-id"]}
    assert len(ids) == 2
    assert all(len(value) == 32 and int(value, 16) >= 0 for value in ids)
    assert first.json()["headers"][REQUEST_ID_HEADER] == first.headers["x-request-id"]


@pytest.mark.parametrize(
    "value",
    [b"", b"x" * (MAX_LENGTH + 1), b"tab\there", b"caf\xc3\xa9", b"nul\x7f"],
    ids=["empty", "too-long", "control", "non-ascii", "del"],
)
def test_an_invalid_id_is_a_400_naming_the_header(value: bytes) -> None:
    async def run() -> httpx.Response:
        async with client() as http:
            request = http.build_request("GET", "/ok")
            request.headers["X-Request-ID"] = value.decode("latin-1")
            return await http.send(request)

    before = len(SEEN)
    response = asyncio.run(run())
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "invalid_request_id"
    assert body["status"] == 400
    assert "X-Request-ID" in body["msg"]
    assert len(response.headers["x-request-id"]) == 32  # a fresh one, to find the log lines
    assert len(SEEN) == before  # the route never ran


def test_an_unexpected_error_is_a_500_that_still_carries_the_id() -> None:
    response = get("/crash", **{"X-Request-ID": "crash-1"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "crash-1"
    assert response.json()["code"] == "internal_error"
    assert "boom" not in response.text


def test_log_lines_of_the_request_carry_its_id() -> None:
    async def logged(_: Request) -> Response:
        logging.getLogger("tests.request").warning("inside")
        return Response("")

    app = Starlette(routes=[Route("/logged", logged)])
    app.add_middleware(RequestId)

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            await http.get("/logged", headers={"X-Request-ID": "logged-1"})

    captured: list[dict[str, object]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            context = structlog.contextvars.get_contextvars()
            captured.append({"event": record.getMessage(), **context})

    handler = Keep()
    logging.getLogger("tests.request").addHandler(handler)
    try:
        asyncio.run(run())
    finally:
        logging.getLogger("tests.request").removeHandler(handler)
    assert captured == [{"event": "inside", "request_id": "logged-1"}]
    assert current_request_id() is None  # nothing leaks out of the request
    assert "request_id" not in structlog.contextvars.get_contextvars()


def test_no_request_no_header_in_the_message() -> None:
    headers = json.loads(encode_task_message("t-2", {}))["headers"]
    assert REQUEST_ID_HEADER not in headers
    assert "traceparent" not in headers  # tracing is off
