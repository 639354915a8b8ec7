"""Many streaming clients at once, each timing every piece it reads against the model's send time.

The load generator of the streaming scenario, on the same plan as shots.py: a minimal HTTP/1.1
client on asyncio streams (thousands of open streams cost a coroutine and a socket each, far
less than httpx would take from the cores the servers share), the clients split across a few
processes that start together at an agreed wall-clock time. Each client POSTs its own numbered
request and reads the chunked answer as it arrives, in one of two ways:

- `pieces`: TorchServe's own body, read directly: each line is a piece of the model
  (bench/models/batchstream.py), `{"n", "i", "of", "t"}`; the body's end ends the stream.
- `events`: the dispatcher's Server-Sent Events: each `output` event's data is such a piece;
  `done` (with the task view, `status` succeeded) ends the stream, `error` fails it; after a
  `restart` (the task runs again) its pieces start over from the first.

Every piece is timed when its line or event is whole at the client: its added latency is that
time minus the model's `t` (one machine, one clock). A client's stream is complete only if it
got every piece of its own request (`n`), in order (`i` = 0, 1, ...), and then its end.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal
from urllib.parse import urlsplit

from bench.machine import raise_open_files_limit
from bench.shots import NUMBER, START_DELAY

Reading = Literal["pieces", "events"]
MAX_HEAD = 65_536


@dataclass(frozen=True)
class StreamVolley:
    """`count` POSTs of `body` (NUMBER replaced by the client's index) to `url`, client i sent
    `ramp * i / count` s after `start_at`; each reads its answer as `reading` says."""

    url: str
    body: bytes
    count: int
    reading: Reading
    headers: tuple[tuple[str, str], ...] = ()
    ramp: float = 0.0
    timeout: float = 120.0
    start_at: float = 0.0  # wall clock (time.time()), shared by the processes


@dataclass
class StreamShot:
    """One client's stream: its status, when it was sent and ended (wall clock), when its first
    piece arrived, each piece's added latency (s), and whether it was complete."""

    status: int = 0
    sent: float = 0.0
    ended: float = 0.0
    first: float = 0.0  # 0: no piece arrived
    first_sent: float = 0.0  # the model's send time of that first piece
    # From the final task view (`events` only): when the API created the task and a worker
    # started it, so a slow first event can be told apart (pickup, model queue, delivery).
    created: float = 0.0
    started: float = 0.0
    latencies: list[float] = field(default_factory=list)
    complete: bool = False
    restarts: int = 0  # `restart` events: the task ran again (its pieces start over)
    error: str = ""


class _Piece:
    """Checks one client's pieces: its own request's, in order, all of them."""

    def __init__(self, shot: StreamShot, n: int) -> None:
        self.shot, self.n, self.expected, self.total = shot, n, 0, -1

    def take(self, data: str, arrived: float) -> None:
        piece = json.loads(data)
        if not isinstance(piece, dict) or piece.get("n") != self.n:
            raise ValueError(f"client {self.n} got another request's piece: {data[:80]!r}")
        if piece.get("i") != self.expected:
            raise ValueError(f"client {self.n}: piece {piece.get('i')}, {self.expected} expected")
        self.expected += 1
        self.total = int(piece["of"])
        if not self.shot.first:
            self.shot.first, self.shot.first_sent = arrived, float(piece["t"])
        self.shot.latencies.append(arrived - float(piece["t"]))

    @property
    def all_read(self) -> bool:
        return self.expected == self.total


def _request(volley: StreamVolley, index: int) -> bytes:
    parts = urlsplit(volley.url)
    body = volley.body.replace(NUMBER, str(index).encode())
    lines = [
        f"POST {parts.path or '/'} HTTP/1.1",
        f"Host: {parts.hostname}:{parts.port or 80}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in volley.headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_HEAD:
        raise ValueError("response head too long")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive: HTTP/1.1 chunks, else whatever reads give to EOF."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers are sent
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    else:
        while data := await reader.read(65_536):
            yield data


def _split(buffer: bytearray, separator: bytes) -> Iterator[bytes]:
    """Whole records off the front of `buffer` (the rest stays for the next data)."""
    while (end := buffer.find(separator)) != -1:
        record = bytes(buffer[:end])
        del buffer[: end + len(separator)]
        yield record


def _event(record: bytes) -> tuple[str, str]:
    """An SSE event's type and data (comments and other fields skipped)."""
    kind, data = "message", []
    for line in record.decode().split("\n"):
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
    return kind, "\n".join(data)


def _ending(pieces: _Piece, record: bytes, arrived: float) -> bool:
    """Take one SSE event; True once it ended the stream (`done` or `error`)."""
    kind, text = _event(record)
    if kind == "output":
        pieces.take(text, arrived)
        return False
    if kind == "restart":
        pieces.shot.restarts += 1
        pieces.expected = 0  # the new attempt's pieces follow, from the first
        return False
    if kind == "done":
        view = json.loads(text)
        status = view.get("status")
        if view.get("created_at") and view.get("started_at"):
            pieces.shot.created = datetime.fromisoformat(view["created_at"]).timestamp()
            pieces.shot.started = datetime.fromisoformat(view["started_at"]).timestamp()
        pieces.shot.complete = status == "succeeded" and pieces.all_read
        if not pieces.shot.complete:
            pieces.shot.error = f"done: {status}, {pieces.expected} of {pieces.total} pieces"
        return True
    if kind == "error":
        # The task's error body: code and message (never payload bytes, by the API's rules).
        body = json.loads(text)
        pieces.shot.error = f"error event: {body.get('code')}: {str(body.get('msg'))[:120]}"
        return True
    return False  # a comment-only record (a keep-alive) or the first `retry:`


async def _read(reader: asyncio.StreamReader, shot: StreamShot, n: int, reading: Reading) -> None:
    shot.status, headers = await _head(reader)
    if shot.status != 200:
        shot.error = f"HTTP {shot.status}"
        return
    pieces, buffer = _Piece(shot, n), bytearray()
    events = reading == "events"
    async for data in _body(reader, headers):
        arrived = time.time()
        buffer += data.replace(b"\r\n", b"\n") if events else data
        for record in _split(buffer, b"\n\n" if events else b"\n"):
            if not events:
                pieces.take(record.decode(), arrived)
            elif _ending(pieces, record, arrived):
                return
    if not events:
        shot.complete = pieces.all_read and not buffer.strip()
    if not shot.complete and not shot.error:
        shot.error = f"ended after {pieces.expected} pieces"


async def _client(host: str, port: int, volley: StreamVolley, index: int) -> StreamShot:
    delay = volley.start_at - time.time() + volley.ramp * index / volley.count
    await asyncio.sleep(max(0.0, delay))
    shot = StreamShot(sent=time.time())
    writer = None
    try:
        async with asyncio.timeout(volley.timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD)
            writer.write(_request(volley, index))
            await _read(reader, shot, index, volley.reading)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as error:
        shot.error = shot.error or f"{type(error).__name__}: {str(error)[:80]}"
    finally:
        shot.ended = time.time()
        if writer is not None:
            writer.close()
    return shot


async def _clients(volley: StreamVolley, indices: range) -> list[StreamShot]:
    parts = urlsplit(volley.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    return await asyncio.gather(*(_client(host, port, volley, i) for i in indices))


def _process_share(volley: StreamVolley, share: int, shares: int) -> list[StreamShot]:
    raise_open_files_limit()
    return asyncio.run(_clients(volley, range(share, volley.count, shares)))


def stream_all(volley: StreamVolley, processes: int) -> list[StreamShot]:
    """Run the volley's clients from `processes` processes; blocks until every stream ended."""
    processes = max(1, min(processes, volley.count))
    timed = replace(volley, start_at=time.time() + START_DELAY)
    # spawn, not fork: the harness runs sampler threads (see shots.py).
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        futures = [
            pool.submit(_process_share, timed, share, processes) for share in range(processes)
        ]
        return [shot for future in futures for shot in future.result()]
