"""A real webhook receiver on 127.0.0.1 for the tests (an HTTP server, not a fake of the sender).

It answers the statuses scripted per path (then 204), can hold a connection open (`HANG`) until
released, and records every request with its headers, body and arrival time.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from devstack import free_port, wait_until

HANG = -1  # a scripted "answer" that never comes


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A ThreadingHTTPServer on 127.0.0.1: scripted statuses per path (then 204), every request
    recorded. `HANG` holds the connection until `release` is set."""

    port: int = field(default_factory=free_port)
    scripts: dict[str, list[int]] = field(default_factory=dict)
    received: defaultdict[str, list[Received]] = field(default_factory=lambda: defaultdict(list))
    release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    receiver.received[self.path].append(
                        Received(dict(self.headers.items()), body, time.monotonic())
                    )
                    script = receiver.scripts.get(self.path) or []
                    status = script.pop(0) if script else 204
                if status == HANG:
                    receiver.release.wait(120)
                    self.close_connection = True
                    return
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def requests(self, path: str, count: int, timeout: float) -> list[Received]:
        """The requests to `path` (its query included), once at least `count` have arrived."""
        wait_until(lambda: len(self.received[path]) >= count, timeout, f"{count} at {path}", 0.05)
        return list(self.received[path])

    def wait(self, path: str, count: int, timeout: float) -> list[tuple[dict[str, str], bytes]]:
        """(headers, body) of the first `count` requests to `path`, once they have arrived."""
        return [(r.headers, r.body) for r in self.requests(path, count, timeout)[:count]]
