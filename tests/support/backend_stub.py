"""A scripted model server on 127.0.0.1 for the API's backend probes (a real HTTP server).

Only what the API asks a backend itself: health, server metadata and model listings. Each
(method, path) answers a scripted status and JSON body (404 otherwise); every request is
recorded with its headers, so a test can see the token sent as Bearer. The real model servers
the workers call are in tests/support/servers.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from devstack import free_port


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class BackendStub:
    """`routes[(method, path)] = (status, json body)`; `delay` seconds before every answer."""

    routes: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)
    delay: float = 0.0
    port: int = field(default_factory=free_port)
    seen: list[Seen] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def calls(self, path: str) -> int:
        with self._lock:
            return sum(1 for s in self.seen if s.path == path)

    def start(self) -> BackendStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("content-length", 0))
                if length:
                    self.rfile.read(length)
                with stub._lock:
                    stub.seen.append(Seen(self.command, self.path, dict(self.headers.items())))
                    status, body = stub.routes.get((self.command, self.path), (404, {"error": "-"}))
                if stub.delay:
                    threading.Event().wait(stub.delay)
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up waiting (a timeout test)

            def do_GET(self) -> None:  # http.server's name
                self._answer()

            def do_POST(self) -> None:  # http.server's name
                self._answer()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> BackendStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def oip_stub(
    *, extensions: list[str], name: str = "stub-oip", models: list[str] | None = None
) -> BackendStub:
    """An OIP server: ready, its metadata, and (if `models`) KServe's model list."""
    routes: dict[tuple[str, str], tuple[int, Any]] = {
        ("GET", "/v2/health/ready"): (200, {"ready": True}),
        ("GET", "/v2"): (200, {"name": name, "version": "1", "extensions": extensions}),
    }
    if models is not None:
        routes[("GET", "/v2/models")] = (200, {"models": models})
    return BackendStub(routes)


def openai_stub(models: list[str]) -> BackendStub:
    """An OpenAI-compatible server's model list (also its health)."""
    listing = {"object": "list", "data": [{"id": m, "object": "model"} for m in models]}
    return BackendStub({("GET", "/v1/models"): (200, listing)})
