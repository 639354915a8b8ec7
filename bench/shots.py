"""Many requests at once, each on its own connection: bursts and thousands of waiting clients.

A minimal HTTP/1.1 client on asyncio streams (no httpx): it costs a few syscalls per request, so
thousands of concurrent requests stay cheap for the load generator, and the requests are split
across a few processes that start together at an agreed wall-clock time.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from bench.machine import raise_open_files_limit

# Lead time for the client processes to start (spawn) before the agreed start.
START_DELAY = 1.5
# Outcome of a request that got no HTTP status (refused, reset, timed out).
NO_STATUS = 0


@dataclass(frozen=True)
class Volley:
    """`count` POSTs of `body` to `url`, request i sent `ramp * i / count` s after `start_at`."""

    url: str
    body: bytes
    count: int
    headers: tuple[tuple[str, str], ...] = ()
    ramp: float = 0.0
    timeout: float = 120.0
    start_at: float = 0.0  # wall clock (time.time()), shared by the processes


@dataclass(frozen=True)
class Shot:
    """One request: its status (0: none) and when it was sent and answered (wall clock)."""

    status: int
    sent: float
    done: float
    error: str = ""


@dataclass(frozen=True)
class VolleyResult:
    shots: list[Shot]

    @property
    def statuses(self) -> Counter[int]:
        return Counter(shot.status for shot in self.shots)

    @property
    def errors(self) -> Counter[str]:
        return Counter(shot.error for shot in self.shots if shot.error)

    def count(self, status: int) -> int:
        return sum(1 for shot in self.shots if shot.status == status)

    @property
    def span(self) -> float:
        """Seconds from the first request sent to the last answer."""
        return max(shot.done for shot in self.shots) - min(shot.sent for shot in self.shots)


def _request_bytes(volley: Volley) -> tuple[str, int, bytes]:
    parts = urlsplit(volley.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lines = [
        f"POST {parts.path or '/'} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(volley.body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in volley.headers),
    ]
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + volley.body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """The status code; reads the body by Content-Length (else to EOF) so the answer is whole."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    length = None
    for line in header_lines:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length is None:
        await reader.read()
    else:
        await reader.readexactly(length)
    return int(status_line.split()[1])


async def _shoot(host: str, port: int, request: bytes, delay: float, limit: float) -> Shot:
    await asyncio.sleep(max(0.0, delay))
    sent = time.time()
    writer = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            status = await _read_response(reader)
        return Shot(status, sent, time.time())
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as error:
        return Shot(NO_STATUS, sent, time.time(), type(error).__name__)
    finally:
        if writer is not None:
            writer.close()


async def _volley(volley: Volley, indices: range) -> list[Shot]:
    host, port, request = _request_bytes(volley)
    delays = [volley.start_at - time.time() + volley.ramp * i / volley.count for i in indices]
    return await asyncio.gather(
        *(_shoot(host, port, request, delay, volley.timeout) for delay in delays)
    )


def _process_share(volley: Volley, share: int, shares: int) -> list[Shot]:
    raise_open_files_limit()
    return asyncio.run(_volley(volley, range(share, volley.count, shares)))


def fire(volley: Volley, processes: int) -> VolleyResult:
    """Send the volley from `processes` processes; blocks until every request has ended."""
    processes = max(1, min(processes, volley.count))
    timed = replace(volley, start_at=time.time() + START_DELAY)
    # spawn, not fork: the harness may run sampler threads, and a forked copy of a threaded
    # process can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        futures = [
            pool.submit(_process_share, timed, share, processes) for share in range(processes)
        ]
        shots = [shot for future in futures for shot in future.result()]
    return VolleyResult(shots)
