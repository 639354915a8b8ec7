"""A lean keep-alive HTTP/1.1 client on asyncio streams and httptools, for calls to model servers.

Why not httpx: a worker makes one HTTP call per prediction, and the call's CPU is taken from the
model on a shared machine. httpx's sync path (httpcore + h11) is the worker's largest single cost
per task, and its async pool costs many times more than that with dozens of calls in flight;
aiohttp is lighter but still pays for a general client. A model call needs little: POST a body
to a known origin over a kept-alive connection, read the status, headers and body (whole, or
chunk by chunk for a streamed answer), honour connect and read timeouts. httptools (the parser
uvicorn uses, already installed with it) does the parsing in C. The measured comparison is in
the CHANGELOG.

What it does not do, on purpose: redirects (never followed: a redirect could point anywhere),
cookies, proxies, HTTP/2, decompression (model servers answer identity; requests say so).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import httptools

READ_SIZE = 65_536
# An idle connection is dropped before a server's own keep-alive timeout is likely to close it
# (uvicorn's default is 5 s), so a reused connection is rarely a closed one.
KEEPALIVE_EXPIRY = 4.0


class HttpError(Exception):
    """Base of what a call can fail with; the message names the origin, never the body."""


class ConnectError(HttpError):
    """No connection: refused, unreachable, a TLS failure."""


class ConnectTimeout(ConnectError):
    """No connection within the connect timeout."""


class ReadTimeout(HttpError):
    """Connected, but the server sent nothing for a whole read timeout."""


class PoolTimeout(ReadTimeout):
    """Every connection to the origin stayed taken for a whole read timeout: to the caller, the
    same as a server that did not answer in time (it was too busy to take the request)."""


class ProtocolError(HttpError):
    """The server closed the connection mid-answer, or sent something that is not HTTP/1.1."""


class Reply(Protocol):
    """What a caller reads of an answer: `Response`, or a test's canned one."""

    @property
    def status(self) -> int: ...

    def header(self, name: str) -> str | None: ...

    async def read(self) -> bytes: ...

    async def aclose(self) -> None: ...


class Transport(Protocol):
    """Where a model call is sent: `Pool`, or a test's fake upstream. Raises the `HttpError`
    types above (and ValueError for a header with a line break)."""

    async def request(
        self,
        method: str,
        url: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        read_timeout: float | None = None,
        connect_timeout: float | None = None,
    ) -> Reply: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Origin:
    """Where connections go: scheme, host and port of a URL."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> tuple[Origin, str]:
        """The origin of `url` and the request target (path and query) to send."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url.split('?')[0]}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.scheme, parts.hostname, port), target

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


@dataclass
class _Message:
    """What httptools reports of one response, as its callbacks arrive."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    chunks: deque[bytes | None] = field(default_factory=deque)  # None: a chunk's end
    headers_done: bool = False
    complete: bool = False
    keep_alive: bool = False
    parser: httptools.HttpResponseParser | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        if body:
            self.chunks.append(body)

    def on_chunk_complete(self) -> None:
        self.chunks.append(None)

    def on_message_complete(self) -> None:
        # Asked now: once the message is complete the parser resets and always says no.
        self.keep_alive = self.parser is not None and self.parser.should_keep_alive()
        self.complete = True


class Connection:
    """One kept-alive connection; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = time.monotonic()
        self.reused = False  # set when the pool hands it out a second time

    def close(self) -> None:
        self.writer.close()

    async def read_some(self, read_timeout: float, origin: Origin) -> bytes:
        try:
            async with asyncio.timeout(read_timeout):
                return await self.reader.read(READ_SIZE)
        except TimeoutError:
            raise ReadTimeout(f"{origin} sent nothing for {read_timeout:g} s") from None
        except OSError as error:
            raise ProtocolError(f"{origin} closed the connection ({error.strerror})") from None


class Response:
    """Status and headers at once; the body with `read()`, `chunks()` or `pieces()` (streamed).

    The connection goes back to the pool once the body is read to its end (or is closed if the
    body is abandoned), and only then is its slot of the origin's cap free: the cap bounds open
    connections, bodies still arriving included. Always read or `aclose()` a response.
    """

    def __init__(
        self, pool: Pool, connection: Connection, parser: httptools.HttpResponseParser,
        message: _Message, origin: Origin, read_timeout: float, slot: asyncio.Semaphore,
    ) -> None:  # fmt: skip
        self.status: int = parser.get_status_code()
        self.headers = message.headers
        self._pool, self._connection, self._parser = pool, connection, parser
        self._message, self._origin, self._read_timeout = message, origin, read_timeout
        self._slot = slot
        self._done = False

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (a chunked answer's chunks, or what each read got)."""
        async with contextlib.aclosing(self.pieces()) as pieces:
            async for piece in pieces:
                if piece:
                    yield piece

    async def pieces(self) -> AsyncGenerator[bytes | None, None]:
        """The body as it arrives, None at each HTTP/1.1 chunk's end (TorchServe's outputs are
        framed so). The read timeout bounds each read, not the body; a cut is ProtocolError."""
        message = self._message
        try:
            while True:
                while message.chunks:
                    yield message.chunks.popleft()
                if message.complete:
                    break
                data = await self._connection.read_some(self._read_timeout, self._origin)
                if not data:
                    # A body delimited by the connection's end (no length, not chunked) ends here.
                    if self.header("content-length") or self.header("transfer-encoding"):
                        raise ProtocolError(f"{self._origin} closed the connection mid-answer")
                    message.complete = True
                    self._finish(keep=False)
                    return
                _feed(self._parser, data, self._origin)
        except BaseException:
            self._finish(keep=False)
            raise
        self._finish(keep=message.keep_alive)

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([chunk async for chunk in self.chunks()])

    async def aclose(self) -> None:
        """Give up on the rest of the body (the connection cannot be reused); no-op once read."""
        self._finish(keep=False)

    def _finish(self, keep: bool) -> None:
        """Put the connection back or close it, and free its slot: once, whatever comes first."""
        if self._done:
            return
        self._done = True
        if keep:
            self._pool.put_back(self._origin, self._connection)
        else:
            self._connection.close()
        self._slot.release()


def _feed(parser: httptools.HttpResponseParser, data: bytes, origin: Origin) -> None:
    try:
        parser.feed_data(data)
    except httptools.HttpParserError as error:
        raise ProtocolError(f"{origin} sent a malformed HTTP/1.1 answer ({error})") from None


class Pool:
    """Kept-alive connections per origin, at most `max_per_origin` open to each at once.

    One per worker process's event loop; it binds to no loop when built (asyncio's semaphores
    find their loop on first wait), so it may be built before the loop runs. A reused connection
    that the server had closed before answering (the keep-alive race: it closed as the request
    was written) is retried once on a new connection: the request never reached a handler that
    could have answered.
    """

    def __init__(
        self, *, connect_timeout: float, read_timeout: float, max_per_origin: int = 256
    ) -> None:
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.max_per_origin = max_per_origin
        self._idle: dict[Origin, deque[Connection]] = {}
        self._slots: dict[Origin, asyncio.Semaphore] = {}
        self._tls: ssl.SSLContext | None = None

    async def request(
        self,
        method: str,
        url: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        read_timeout: float | None = None,
        connect_timeout: float | None = None,
    ) -> Response:
        """Send one request and return once the answer's status and headers are in.

        Waits at most the read timeout for one of the origin's `max_per_origin` slots; the
        returned response holds its slot until it is read to its end or closed. The timeouts
        default to the pool's; a caller passes its backend's (one pool serves every backend).
        """
        origin, target = Origin.of(url)
        head = _head(method, target, origin, headers, len(body))
        timeout = self.read_timeout if read_timeout is None else read_timeout
        slot = self._slots.get(origin)
        if slot is None:
            slot = self._slots[origin] = asyncio.Semaphore(self.max_per_origin)
        await _acquire(slot, origin, timeout)
        try:
            for _ in range(2):
                connection = self._take(origin) or await self._connect(origin, connect_timeout)
                try:
                    return await self._exchange(connection, origin, head + body, timeout, slot)
                except _StaleConnection:
                    continue
            raise ProtocolError(f"{origin} closed two connections before answering")
        except BaseException:
            slot.release()  # no response owns it
            raise

    def put_back(self, origin: Origin, connection: Connection) -> None:
        connection.idle_since = time.monotonic()
        self._idle.setdefault(origin, deque()).append(connection)

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the idle connections (those of unread answers close with them)."""
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    def _take(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be closed
            if (
                now - connection.idle_since < KEEPALIVE_EXPIRY
                and not connection.reader.at_eof()
                and not connection.writer.is_closing()
            ):
                connection.reused = True
                return connection
            connection.close()
        return None

    async def _connect(self, origin: Origin, seconds: float | None) -> Connection:
        tls = None
        if origin.scheme == "https":
            tls = self._tls = self._tls or ssl.create_default_context()
        seconds = self.connect_timeout if seconds is None else seconds
        try:
            async with asyncio.timeout(seconds):
                reader, writer = await asyncio.open_connection(origin.host, origin.port, ssl=tls)
        except TimeoutError:
            raise ConnectTimeout(f"no connection to {origin} in {seconds:g} s") from None
        except OSError as error:
            raise ConnectError(f"cannot connect to {origin} ({error.strerror or error})") from None
        return Connection(reader, writer)

    async def _exchange(
        self, connection: Connection, origin: Origin, request: bytes, read_timeout: float,
        slot: asyncio.Semaphore,
    ) -> Response:  # fmt: skip
        message = _Message()
        parser = message.parser = httptools.HttpResponseParser(message)
        try:
            try:
                connection.writer.write(request)
            except (OSError, RuntimeError):  # closed under us (uvloop raises RuntimeError)
                if connection.reused:
                    raise _StaleConnection from None
                raise ProtocolError(f"{origin} closed the connection before the request") from None
            while not message.headers_done:
                data = await connection.read_some(read_timeout, origin)
                if not data:
                    if connection.reused and not message.headers:
                        raise _StaleConnection
                    raise ProtocolError(f"{origin} closed the connection before answering")
                _feed(parser, data, origin)
        except BaseException:
            connection.close()
            raise
        return Response(self, connection, parser, message, origin, read_timeout, slot)


async def _acquire(slot: asyncio.Semaphore, origin: Origin, seconds: float) -> None:
    if not slot.locked():
        await slot.acquire()  # free: taken at once, no timer to arm
        return
    try:
        async with asyncio.timeout(seconds):
            await slot.acquire()
    except TimeoutError:
        raise PoolTimeout(f"no free connection to {origin} in {seconds:g} s") from None


class _StaleConnection(Exception):
    """A reused connection ended before any byte of an answer: send again on a new one."""


def _head(
    method: str, target: str, origin: Origin, headers: Iterable[tuple[str, str]], length: int
) -> bytes:
    default_port = 443 if origin.scheme == "https" else 80
    host = origin.host if origin.port == default_port else f"{origin.host}:{origin.port}"
    if ":" in origin.host:  # an IPv6 literal
        host = f"[{origin.host}]" + ("" if origin.port == default_port else f":{origin.port}")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", f"Content-Length: {length}"]
    lines += [f"{name}: {value}" for name, value in headers]
    for line in lines:
        if "\r" in line or "\n" in line:
            raise ValueError("a header must not contain a line break")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
