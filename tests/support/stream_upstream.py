"""A model server on 127.0.0.1 that streams on cue and breaks on cue: for the stream-fault tests.

No real server can be told to stop mid-stream without `[DONE]`, to cut a chunked body short, to
fall silent after its first chunk, or to answer 503 once and then stream; the stream-fault
tests (tests/e2e/test_stream_upstream_faults.py) need exactly that, and need to count at the
server how many calls the workers made (one: nothing retried once an output was sent; two: a
503 before any chunk was retried).

Each path answers its script in order, the last step repeating, as scripted_backend.py's does
(its `Step` is the whole, non-streamed answer here too). A `Streamed` step sends its status and
headers, then each piece as one HTTP/1.1 chunk, then ends the body as its `ending` says:
- `complete`: the last chunk (`0\\r\\n\\r\\n`), a body that ended cleanly;
- `cut`: the connection is closed without the last chunk, a body cut short;
- `hang`: nothing more until the test lets go (`release()`, or `stop()`), then `cut`: a server
  gone silent. The hold is an Event, not a sleep, so no timing decides what the worker sees
  (bounded by HANG_LIMIT_SECONDS should a test never let go).

`pieces` are bytes as they go on the wire; `sse()` frames JSON values as `data:` events.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, Self

from tests.support.scripted_backend import Call, Step

Ending = Literal["complete", "cut", "hang"]
# The longest a `hang` step holds its connection if the test never lets go.
HANG_LIMIT_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Streamed:
    """A streamed answer: `status`, then `pieces` one HTTP/1.1 chunk each, then `ending`."""

    pieces: tuple[bytes, ...]
    ending: Ending = "complete"
    status: int = 200
    content_type: str = "text/event-stream"


def sse(*values: Any) -> tuple[bytes, ...]:
    """One `data:` event per value: JSON, or the string itself for str (`[DONE]`)."""
    return tuple(
        f"data: {value if isinstance(value, str) else json.dumps(value)}\n\n".encode()
        for value in values
    )


@dataclass
class _Script:
    steps: tuple[Step | Streamed, ...]
    answered: int = 0

    def next(self) -> Step | Streamed:
        step = self.steps[min(self.answered, len(self.steps) - 1)]
        self.answered += 1
        return step


class StreamUpstream:
    """`script(path, *steps)`, then `listen()` (or `with`); `calls(path)` says what came."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scripts: dict[str, _Script] = {}
        self._calls: list[Call] = []
        self._released = threading.Event()
        self._thread: threading.Thread | None = None
        self._server = _Server(self)
        self.port: int = self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, path: str, *steps: Step | Streamed) -> None:
        """POST `path` answers `steps` in order from now on (the last repeating); its calls
        are forgotten (a test counts its own) and `hang` steps hold again until `release()`."""
        if not steps:
            raise ValueError("a script needs at least one step")
        with self._lock:
            self._scripts[path] = _Script(tuple(steps))
            self._calls = [call for call in self._calls if call.path != path]
            self._released.clear()

    def calls(self, path: str | None = None) -> list[Call]:
        with self._lock:
            return [call for call in self._calls if path is None or call.path == path]

    def count(self, path: str) -> int:
        return len(self.calls(path))

    def release(self) -> None:
        """Let every `hang` step (now and later) go on to close its connection."""
        self._released.set()

    def listen(self) -> Self:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.listen()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> Step | Streamed:
        """The step for one request, recorded (the handler's call)."""
        with self._lock:
            script = self._scripts.get(path) if method == "POST" else None
            step = script.next() if script else Step(404, {"error": f"no script: {path}"})
            self._calls.append(Call(method, path, headers, body, time.monotonic(), step.status))
        return step

    def hold(self) -> None:
        """A `hang` step's wait: until `release()` (or HANG_LIMIT_SECONDS)."""
        self._released.wait(HANG_LIMIT_SECONDS)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: StreamUpstream) -> None:
        self.upstream = upstream
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked bodies
    server: _Server

    def _serve(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        step = self.server.upstream.answer(self.command, self.path, headers, body)
        try:
            if isinstance(step, Streamed):
                self._stream(step)
            else:
                self._whole(step)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the worker closed its end first

    def _whole(self, step: Step) -> None:
        data = json.dumps(step.body).encode()
        self.send_response(step.status)
        for name, value in step.headers:
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, step: Streamed) -> None:
        self.send_response(step.status)
        self.send_header("Content-Type", step.content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        for piece in step.pieces:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
        if step.ending == "hang":
            self.server.upstream.hold()
        if step.ending == "complete":
            self.wfile.write(b"0\r\n\r\n")
        else:  # no last chunk: the client sees a body cut short
            self.close_connection = True

    def do_GET(self) -> None:  # http.server's name
        self._serve()

    def do_POST(self) -> None:  # http.server's name
        self._serve()

    def log_message(self, *args: Any) -> None:
        pass
