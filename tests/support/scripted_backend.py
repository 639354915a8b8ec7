"""A scripted model server on 127.0.0.1 for the workers' fault tests (a real HTTP server).

Real model servers cannot be made to answer 429 then 200 on cue, to refuse a token while
echoing it, or to be down and come back mid-retry; the fault tests need exactly that, and need
to count at the server what the workers sent: calls per path, per `X-Request-ID` and per body
marker, with their headers and arrival times (how a test proves no call was lost or doubled,
and that a Retry-After was waited). Each path answers its script of steps in order, the last
one repeating; an unscripted path is a 404. A path prefix may require a Bearer token, answered
401 with a body that echoes the credential it got, as some servers do.

The port is bound when the object is made (a free one, chosen by the kernel), but nothing is
accepted until `listen()`: a bound socket that does not listen refuses connections, so the same
object is a backend that is down (nothing listening, and no other process can take the port)
and then one that comes back. `BackendStub` (backend_stub.py) is the API probes' simpler stub.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

Headers = tuple[tuple[str, str], ...]
# What a refused credential's 401 says, given the Authorization header it got.
Refusal = Callable[[str], Any]


@dataclass(frozen=True, slots=True)
class Step:
    """One scripted answer: a status, its headers and JSON body. `echo`: the body is
    `{"error": "... <the request body> ..."}`, as a server whose error quotes its input."""

    status: int = 200
    body: Any = None
    headers: Headers = ()
    echo: bool = False


@dataclass(frozen=True, slots=True)
class Call:
    """One request as the server received it; `at` is `time.monotonic()` on arrival."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at: float
    status: int  # what it was answered

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-request-id")

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Path:
    steps: tuple[Step, ...]
    answered: int = 0

    def next(self) -> Step:
        step = self.steps[min(self.answered, len(self.steps) - 1)]
        self.answered += 1
        return step


def _default_refusal(authorization: str) -> Any:
    return {"error": f"invalid credentials: {authorization!r}"}


@dataclass
class _Guard:
    token: str
    refusal: Refusal


class ScriptedBackend:
    """`script(path, *steps)`, then `listen()`; `calls(...)` / `count(...)` say what came."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: dict[tuple[str, str], _Path] = {}
        self._guards: dict[str, _Guard] = {}
        self._calls: list[Call] = []
        self._thread: threading.Thread | None = None
        self._server = ThreadingHTTPServer(
            ("127.0.0.1", 0), self._handler(), bind_and_activate=False
        )
        self._server.daemon_threads = True
        self._server.server_bind()  # the port is ours from here on; refused until listen()
        self.port: int = self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- the script -----------------------------------------------------------------------

    def script(self, path: str, *steps: Step, method: str = "POST") -> None:
        """`path` answers `steps` in order from now on (the last repeating), its count reset."""
        if not steps:
            raise ValueError("a script needs at least one step")
        with self._lock:
            self._paths[(method, path)] = _Path(steps)

    def require_token(self, prefix: str, token: str, refusal: Refusal = _default_refusal) -> None:
        """Paths under `prefix` answer 401 `refusal(authorization)` unless sent
        `Authorization: Bearer <token>`."""
        with self._lock:
            self._guards[prefix] = _Guard(token, refusal)

    # --- what came ------------------------------------------------------------------------

    def calls(
        self, path: str | None = None, *, request_id: str | None = None, marker: str | None = None
    ) -> list[Call]:
        """The calls received, in order, of `path`, carrying `request_id` and whose body
        contains `marker` (each filter only when given)."""
        with self._lock:
            found = list(self._calls)
        return [
            call
            for call in found
            if (path is None or call.path == path)
            and (request_id is None or call.request_id == request_id)
            and (marker is None or marker.encode() in call.body)
        ]

    def count(
        self, path: str | None = None, *, request_id: str | None = None, marker: str | None = None
    ) -> int:
        return len(self.calls(path, request_id=request_id, marker=marker))

    # --- the server -----------------------------------------------------------------------

    def listen(self) -> Self:
        """Start accepting connections (from now on the backend is up)."""
        if self._thread is None:
            self._server.server_activate()
            self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.listen()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Step:
        """The step for one request, recorded with what it was answered."""
        with self._lock:
            step = self._guarded(path, headers.get("authorization", ""))
            if step is None:
                scripted = self._paths.get((method, path))
                step = scripted.next() if scripted else Step(404, {"error": f"no script: {path}"})
            if step.echo:
                text = body.decode("utf-8", errors="replace")
                step = Step(step.status, {"error": f"cannot run on input {text}"}, step.headers)
            self._calls.append(Call(method, path, headers, body, time.monotonic(), step.status))
        return step

    def _guarded(self, path: str, authorization: str) -> Step | None:
        for prefix, guard in self._guards.items():
            if path.startswith(prefix) and authorization != f"Bearer {guard.token}":
                return Step(401, guard.refusal(authorization))
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the workers' pool expects

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {name.lower(): value for name, value in self.headers.items()}
                step = backend._answer(self.command, self.path, headers, body)
                data = json.dumps(step.body).encode()
                try:
                    self.send_response(step.status)
                    for name, value in step.headers:
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the caller gave up waiting

            def do_GET(self) -> None:  # http.server's name
                self._serve()

            def do_POST(self) -> None:  # http.server's name
                self._serve()

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
