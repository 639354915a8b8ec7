"""Many requests at once, each on its own connection: bursts and thousands of waiting clients.

A minimal HTTP/1.1 client on asyncio streams (no httpx): it costs a few syscalls per request, so
thousands of concurrent requests stay cheap for the load generator, and the requests are split
across a few processes that start together at an agreed wall-clock time.
"""

from __future__ import annotations

import asyncio
import json
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
# In a numbered volley, replaced by the request's index in its body (and in the expected answer).
NUMBER = b"@N@"


@dataclass(frozen=True)
class Volley:
    """`count` POSTs of `body` to `url`, request i sent `ramp * i / count` s after `start_at`.

    With `answer` set, the volley is numbered: request i's body has NUMBER replaced by i, and its
    response is its own only if the JSON answer's `prediction_value` equals `answer` (JSON) with
    the same replacement, so each client can tell it got its own task's result.
    """

    url: str
    body: bytes
    count: int
    headers: tuple[tuple[str, str], ...] = ()
    ramp: float = 0.0
    timeout: float = 120.0
    start_at: float = 0.0  # wall clock (time.time()), shared by the processes
    answer: bytes | None = None


@dataclass(frozen=True)
class Shot:
    """One request: its status (0: none) and when it was sent and answered (wall clock).

    `own_answer`: in a numbered volley, whether the answer was this request's own.
    """

    status: int
    sent: float
    done: float
    error: str = ""
    own_answer: bool = False


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
    def own_answers(self) -> int:
        return sum(1 for shot in self.shots if shot.own_answer)

    @property
    def span(self) -> float:
        """Seconds from the first request sent to the last answer."""
        return max(shot.done for shot in self.shots) - min(shot.sent for shot in self.shots)


def _request_bytes(volley: Volley, body: bytes) -> bytes:
    parts = urlsplit(volley.url)
    lines = [
        f"POST {parts.path or '/'} HTTP/1.1",
        f"Host: {parts.hostname}:{parts.port or 80}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in volley.headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _numbered(template: bytes, index: int) -> bytes:
    return template.replace(NUMBER, str(index).encode())


def _is_own(body: bytes, expected: bytes) -> bool:
    """Whether a JSON answer's `prediction_value` is `expected` (JSON)."""
    try:
        answer = json.loads(body)
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("prediction_value") == json.loads(expected)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The status code and body; read by Content-Length (else to EOF) so the answer is whole."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    length = None
    for line in header_lines:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    body = await reader.read() if length is None else await reader.readexactly(length)
    return int(status_line.split()[1]), body


async def _shoot(
    host: str, port: int, request: bytes, delay: float, limit: float, expected: bytes | None
) -> Shot:
    await asyncio.sleep(max(0.0, delay))
    sent = time.time()
    writer = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            status, body = await _read_response(reader)
        own = expected is not None and status == 200 and _is_own(body, expected)
        return Shot(status, sent, time.time(), own_answer=own)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as error:
        return Shot(NO_STATUS, sent, time.time(), type(error).__name__)
    finally:
        if writer is not None:
            writer.close()


async def _volley(volley: Volley, indices: range) -> list[Shot]:
    parts = urlsplit(volley.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    plain = _request_bytes(volley, volley.body)
    shots = []
    for i in indices:
        delay = volley.start_at - time.time() + volley.ramp * i / volley.count
        if volley.answer is None:
            request, expected = plain, None
        else:
            request = _request_bytes(volley, _numbered(volley.body, i))
            expected = _numbered(volley.answer, i)
        shots.append(_shoot(host, port, request, delay, volley.timeout, expected))
    return await asyncio.gather(*shots)


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
