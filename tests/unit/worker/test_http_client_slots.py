"""worker/http_client.py's per-origin slots against real sockets: calls in flight are capped, an
unread answer holds its slot, a wait for one is bounded, and no way a request ends leaks one."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.unit.worker.http_server import answer, pool, run, running
from worker.http_client import (
    ConnectError,
    PoolTimeout,
    ProtocolError,
    ReadTimeout,
)


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
