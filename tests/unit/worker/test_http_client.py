"""worker/http_client.py against real sockets: an asyncio server on 127.0.0.1 that answers each
request the way its path asks (length-delimited, chunked, closed, slow, malformed)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from tests.unit.worker.http_server import pool, run, running
from worker.http_client import (
    ConnectError,
    ConnectTimeout,
    Origin,
    ProtocolError,
    ReadTimeout,
    Transport,
)


def test_a_post_gets_status_headers_and_body_and_the_connection_is_kept() -> None:
    async def scenario() -> None:
        async with running() as server:
            client = pool()
            for n in range(3):
                response = await client.request(
                    "POST",
                    f"{server.url}/echo",
                    [("Content-Type", "application/json")],
                    b'{"n":%d}' % n,
                )
                assert response.status == 200
                assert response.header("content-type") == "application/json"
                assert await response.read() == b'{"n":%d}' % n
            assert server.connections == 1  # one kept-alive connection for all three
            path, headers, _ = server.requests[0]
            assert (path, headers["Host"], headers["Content-Type"]) == (
                "/echo",
                server.url[7:],
                "application/json",
            )

    run(scenario())


def test_a_chunked_answer_is_read_chunk_by_chunk_as_it_arrives() -> None:
    async def scenario() -> None:
        async with running() as server:
            client = pool()
            response = await client.request("POST", f"{server.url}/chunked")
            seen = [chunk async for chunk in response.chunks()]
            assert seen == [b"one ", b"two ", b"three"]
            again = await client.request("POST", f"{server.url}/echo", body=b"x")
            assert await again.read() == b"x"
            assert server.connections == 1  # the chunked answer's connection was reused

    run(scenario())


def test_a_body_that_ends_with_the_connection_is_read_whole() -> None:
    async def scenario() -> None:
        async with running() as server:
            response = await pool().request("POST", f"{server.url}/until-close")
            assert await response.read() == b"all of it"

    run(scenario())


def test_a_kept_alive_connection_the_server_closed_is_replaced_without_an_error() -> None:
    async def scenario() -> None:
        async with running() as server:
            client = pool()
            first = await client.request("POST", f"{server.url}/once")
            assert await first.read() == b"once"
            await asyncio.sleep(0.2)  # the server has closed that connection meanwhile
            second = await client.request("POST", f"{server.url}/echo", body=b"again")
            assert await second.read() == b"again"
            assert server.connections == 2

    run(scenario())


@pytest.mark.parametrize("loop_factory", [None, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
@pytest.mark.parametrize("path", ["/once", "/once-reset"])
def test_a_kept_alive_connection_closed_or_reset_is_replaced_on_either_loop(
    path: str, loop_factory: Callable[[], Any] | None
) -> None:
    # The engine runs on uvloop, whose transports raise on a write after the peer reset them.
    async def scenario() -> None:
        async with running() as server:
            client = pool()
            first = await client.request("POST", f"{server.url}{path}")
            assert await first.read() == b"once"
            await asyncio.sleep(0.2)  # the server has closed or reset that connection meanwhile
            second = await client.request("POST", f"{server.url}/echo", body=b"again")
            assert await second.read() == b"again"
            assert server.connections == 2

    run(scenario(), loop_factory)


def test_timeouts_and_failures_are_typed_and_name_the_origin_only() -> None:
    async def scenario() -> None:
        async with running() as server:
            with pytest.raises(ReadTimeout, match=r"127\.0\.0\.1.*0\.2 s"):
                await pool(read_timeout=0.2).request("POST", f"{server.url}/slow", body=b"secret")
            with pytest.raises(ProtocolError, match="closed the connection mid-answer"):
                await (await pool().request("POST", f"{server.url}/cut")).read()
            with pytest.raises(ProtocolError, match="malformed"):
                await pool().request("POST", f"{server.url}/garbage")
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        with pytest.raises(ConnectError, match=f"127.0.0.1:{port}") as refused:
            await pool().request("POST", f"http://127.0.0.1:{port}/x", body=b"secret")
        assert "secret" not in str(refused.value)

    run(scenario())


def test_a_connect_that_hangs_is_a_connect_timeout() -> None:
    async def scenario() -> None:
        # A listening socket whose backlog is full: the next handshake never completes.
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            port = listener.getsockname()[1]
            fillers = []
            try:
                for _ in range(8):
                    filler = socket.socket()
                    filler.setblocking(False)
                    fillers.append(filler)
                    filler.connect_ex(("127.0.0.1", port))
                with pytest.raises(ConnectTimeout, match=r"no connection to .* in 0\.3 s"):
                    await pool(connect_timeout=0.3).request("POST", f"http://127.0.0.1:{port}/")
            finally:
                for filler in fillers:
                    filler.close()

    run(scenario())


def test_a_pool_built_before_the_loop_serves_in_it() -> None:
    """The worker builds its client before its event loop runs; nothing in it binds a loop."""
    made: Transport = pool(max_per_origin=1)

    async def scenario() -> bytes:
        async with running() as server:
            responses = [made.request("POST", f"{server.url}/echo", body=b"%d" % n) for n in (1, 2)]
            replies = await asyncio.gather(*[_read(r) for r in responses])
            return b"".join(replies)

    assert run(scenario()) == b"12"


async def _read(pending: Awaitable[Any]) -> bytes:
    body: bytes = await (await pending).read()
    return body


def test_urls_and_headers_are_checked() -> None:
    assert Origin.of("https://models.internal/v2/models/m/infer?x=1") == (
        Origin("https", "models.internal", 443),
        "/v2/models/m/infer?x=1",
    )
    with pytest.raises(ValueError, match="not an http"):
        Origin.of("ftp://host/file")

    async def scenario() -> None:
        with pytest.raises(ValueError, match="line break"):
            await pool().request("POST", "http://127.0.0.1:9/x", [("X-Bad", "a\r\nInjected: 1")])

    run(scenario())
