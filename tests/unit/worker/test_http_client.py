"""worker/http_client.py against real sockets: an asyncio server on 127.0.0.1 that answers each
request the way its path asks (length-delimited, chunked, closed, slow, malformed)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop

from worker.http_client import (
    ConnectError,
    ConnectTimeout,
    Origin,
    Pool,
    PoolTimeout,
    ProtocolError,
    ReadTimeout,
    Transport,
)

Handler = Callable[[str, bytes, asyncio.StreamWriter], Awaitable[bool]]


class Server:
    """Counts connections and requests; `handler` answers and says whether to keep the socket."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.url = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = dict(line.split(": ", 1) for line in lines[1:] if line)
                body = await reader.readexactly(int(headers.get("Content-Length", "0")))
                self.requests.append((path, headers, body))
                if not await self.handler(path, body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def answer(status: int, body: bytes, *extra: str) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def routes(path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
    if path == "/echo":
        writer.write(answer(200, body, "Content-Type: application/json"))
    elif path == "/chunked":
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"one ", b"two ", b"three"):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
    elif path == "/until-close":
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()
        return False
    elif path == "/once":  # answers, then closes the kept-alive connection after a moment
        writer.write(answer(200, b"once"))
        await writer.drain()
        await asyncio.sleep(0.05)
        return False
    elif path == "/once-reset":  # answers, then resets the connection (RST, not FIN)
        writer.write(answer(200, b"once"))
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False
    elif path == "/slow":
        await asyncio.sleep(1)
        writer.write(answer(200, b"late"))
    elif path == "/cut":
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        return False
    elif path == "/garbage":
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        return False
    await writer.drain()
    return True


@asynccontextmanager
async def running(handler: Handler = routes) -> AsyncIterator[Server]:
    server = Server(handler)
    listener = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}"
    async with listener:
        yield server


_POOLS: list[Pool] = []


def pool(**overrides: Any) -> Pool:
    """A pool that `run` closes when its scenario ends."""
    made = Pool(**{"connect_timeout": 2.0, "read_timeout": 5.0, **overrides})
    _POOLS.append(made)
    return made


def run(coroutine: Awaitable[Any], loop_factory: Callable[[], Any] | None = None) -> Any:
    async def main() -> Any:
        try:
            return await coroutine
        finally:
            while _POOLS:
                await _POOLS.pop().aclose()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


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


def test_calls_in_flight_per_origin_are_capped() -> None:
    async def scenario() -> None:
        in_flight = peak = 0

        async def slow(path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.05)
            in_flight -= 1
            writer.write(answer(200, body))
            await writer.drain()
            return True

        async with running(slow) as server:
            client = pool(max_per_origin=4)

            async def one(n: int) -> bytes:
                response = await client.request("POST", f"{server.url}/x", body=b"%d" % n)
                return await response.read()

            bodies = await asyncio.gather(*(one(n) for n in range(20)))
            assert bodies == [b"%d" % n for n in range(20)]
            assert peak == 4
            assert server.connections == 4

    run(scenario())


def test_an_unread_answer_holds_its_slot_until_it_is_read() -> None:
    async def scenario() -> None:
        async with running() as server:
            client = pool(max_per_origin=2)
            url = f"{server.url}/echo"
            first = await client.request("POST", url, body=b"1")
            second = await client.request("POST", url, body=b"2")
            third = asyncio.create_task(client.request("POST", url, body=b"3"))
            await asyncio.sleep(0.2)
            assert not third.done()  # two bodies unread: both connections still taken
            assert len(server.requests) == 2
            assert await first.read() == b"1"
            response = await asyncio.wait_for(third, 2)
            assert await response.read() == b"3"
            assert await second.read() == b"2"
            assert server.connections == 2  # the third went on the first's connection

    run(scenario())


def test_a_slot_waits_at_most_the_read_timeout() -> None:
    async def scenario() -> None:
        async with running() as server:
            client = pool(max_per_origin=1)
            held = await client.request("POST", f"{server.url}/echo", body=b"held")
            with pytest.raises(PoolTimeout, match=r"no free connection to .* in 0\.2 s"):
                await client.request("POST", f"{server.url}/echo", read_timeout=0.2)
            await held.aclose()  # given up unread: the slot is free again
            again = await client.request("POST", f"{server.url}/echo", body=b"ok")
            assert await again.read() == b"ok"

    run(scenario())


def test_no_way_a_request_ends_leaks_its_slot() -> None:
    """With one slot, a leak on any path makes the next request wait for ever (a PoolTimeout)."""

    async def scenario() -> None:
        async with running() as server:
            client = pool(max_per_origin=1, read_timeout=2.0)

            async def echo() -> None:
                response = await client.request("POST", f"{server.url}/echo", body=b"e")
                assert await response.read() == b"e"

            with pytest.raises(ReadTimeout):  # no answer in time
                await client.request("POST", f"{server.url}/slow", read_timeout=0.1)
            await echo()
            with pytest.raises(ProtocolError):  # cut mid-body
                await (await client.request("POST", f"{server.url}/cut")).read()
            await echo()
            with pytest.raises(ProtocolError):  # not HTTP
                await client.request("POST", f"{server.url}/garbage")
            await echo()
            waiting = asyncio.create_task(client.request("POST", f"{server.url}/slow"))
            await asyncio.sleep(0.1)
            waiting.cancel()  # cancelled while waiting for the answer
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await echo()
            response = await client.request("POST", f"{server.url}/chunked")
            async for _ in response.chunks():
                break  # abandoned after its first chunk
            await response.aclose()
            await echo()
            assert await (await client.request("POST", f"{server.url}/until-close")).read()
            await echo()
            assert await (await client.request("POST", f"{server.url}/once")).read() == b"once"
            await asyncio.sleep(0.2)  # the kept-alive connection is closed: a stale retry
            await echo()
            with pytest.raises(ValueError, match="line break"):
                await client.request("POST", f"{server.url}/echo", [("X", "a\nb")])
            await echo()
            unreachable = pool(max_per_origin=1)
            with socket.socket() as unused:
                unused.bind(("127.0.0.1", 0))
                port = unused.getsockname()[1]
            for _ in range(2):  # refused twice: the first did not keep the slot
                with pytest.raises(ConnectError):
                    await unreachable.request("POST", f"http://127.0.0.1:{port}/", read_timeout=1)

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
