"""The server worker/http_client.py's tests talk to: an asyncio server on 127.0.0.1 that answers
each request the way its path asks (length-delimited, chunked, closed, slow, malformed), and the
pools a scenario opens, closed when it ends."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from worker.http_client import (
    Pool,
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


POOLS: list[Pool] = []


def pool(**overrides: Any) -> Pool:
    """A pool that `run` closes when its scenario ends."""
    made = Pool(**{"connect_timeout": 2.0, "read_timeout": 5.0, **overrides})
    POOLS.append(made)
    return made


def run(coroutine: Awaitable[Any], loop_factory: Callable[[], Any] | None = None) -> Any:
    async def main() -> Any:
        try:
            return await coroutine
        finally:
            while POOLS:
                await POOLS.pop().aclose()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())
