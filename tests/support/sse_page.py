"""A page server for the browser stream test: an `EventSource` page, and the API behind it.

A browser's EventSource follows the same-origin rules of the page that made it, and what the
test needs to see happens between the browser and the API: so one server in the test process
serves the page (`/`, its script as `/page.js`, no inline script and nothing from another
host) and forwards `/dispatch_model` and `/tasks/...` to the real API. On the way it
- cuts the first stream response after `cut_after` events, as a server or a proxy that dies
  mid-stream does: the chunked body just stops (no last chunk), the socket is closed;
- records every stream request: its `Last-Event-ID` header (what the browser sent by itself when
  it reconnected), its query, the status, the ids it passed on and when it came;
- takes the page's `POST /report` at the end: the events the page's EventSource dispatched, its
  connection errors and any JavaScript error.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit

import httpx

# Per-hop headers, and the encoding of a body httpx has already decoded: never forwarded.
HOP_HEADERS = frozenset(
    {"connection", "transfer-encoding", "content-length", "content-encoding", "keep-alive", "host"}
)
REPORT_MAX_BYTES = 1_000_000

PAGE_HTML = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>stream test</title>
<script src="/page.js" defer></script></head>
<body><pre id="log"></pre></body></html>
"""

# The page: dispatch the job (`/job.json`) asynchronously, follow its stream_url with an
# EventSource and record every event as the browser dispatched it. After `done` it closes the
# EventSource (it would reconnect otherwise), then opens a second one resuming after `done`:
# the API's 204 must make the browser give that one up (readyState CLOSED). A server `error`
# event is a MessageEvent with data; the EventSource's own connection error has none.
PAGE_JS = b""""use strict";
const events = [];
const connectionErrors = [];
const jsErrors = [];
const opens = [];
let probe = null;
let reported = false;

function report(outcome, extra) {
  if (reported) return;
  reported = true;
  const body = {outcome, events, connectionErrors, opens, jsErrors, probe, ...extra};
  fetch("/report", {method: "POST", headers: {"Content-Type": "application/json"},
                    body: JSON.stringify(body)});
}
window.addEventListener("error", (e) => {
  jsErrors.push(String(e.message || e.type) + " at " + e.filename + ":" + e.lineno);
  report("js-error");
});
window.addEventListener("unhandledrejection", (e) => {
  jsErrors.push("unhandled rejection: " + String(e.reason));
  report("js-error");
});

function record(e) {
  events.push({type: e.type, id: e.lastEventId, data: e.data});
  document.getElementById("log").textContent += e.type + " " + e.lastEventId + "\\n";
}

function probeAfter(streamUrl, lastId) {
  probe = {events: [], readyState: null};
  const url = streamUrl + "?last_event_id=" + encodeURIComponent(lastId);
  const again = new EventSource(url);
  for (const kind of ["output", "restart", "done", "message"]) {
    again.addEventListener(kind, (e) => probe.events.push({type: e.type, id: e.lastEventId}));
  }
  const gaveUp = setTimeout(() => { again.close(); report("probe-still-open"); }, 10000);
  again.addEventListener("error", () => {
    probe.readyState = again.readyState;
    clearTimeout(gaveUp);
    again.close();
    report("done");
  });
}

async function main() {
  const job = await (await fetch("/job.json")).json();
  const answer = await fetch("/dispatch_model", {
    method: "POST",
    headers: {"Content-Type": "application/json", "Prefer": "respond-async"},
    body: JSON.stringify(job),
  });
  const accepted = await answer.json();
  if (answer.status !== 202 || !accepted.stream_url) {
    report("not-accepted", {status: answer.status, answer: accepted});
    return;
  }
  const source = new EventSource(accepted.stream_url);
  source.addEventListener("open", () => opens.push(events.length));
  source.addEventListener("output", record);
  source.addEventListener("restart", record);
  source.addEventListener("message", record);
  source.addEventListener("done", (e) => {
    record(e);
    source.close();
    probeAfter(accepted.stream_url, e.lastEventId);
  });
  source.addEventListener("error", (e) => {
    if (e.data !== undefined) {
      record(e);
      source.close();
      report("error-event");
    } else {
      connectionErrors.push({readyState: source.readyState, after: events.length});
    }
  });
}
main().catch((error) => { jsErrors.push("main: " + String(error)); report("js-error"); });
"""


@dataclass
class StreamRequest:
    """One `GET /tasks/{id}/stream` the browser made, as the proxy saw and answered it."""

    path: str
    last_event_id: str | None
    started: float  # time.time() when it came in
    status: int = 0
    sent_ids: list[str] = field(default_factory=list)  # the event ids passed on, in order
    cut: bool = False
    ended: float = 0.0


class SsePageServer:
    """The page plus a forwarding proxy to `upstream` (the API); see the module docstring.

    `job` is the dispatch body the page posts; the first stream response is cut after
    `cut_after` events. Use as a context manager; `wait_report(timeout)` returns the page's
    report (None if it did not come in time).
    """

    def __init__(self, upstream: str, job: dict[str, Any], cut_after: int) -> None:
        self.upstream = upstream
        self.job = job
        self.cut_after = cut_after
        self.streams: list[StreamRequest] = []
        self.paths: list[str] = []  # every request's method and path, in order
        self.lock = threading.Lock()
        self._report: dict[str, Any] | None = None
        self._reported = threading.Event()
        self._http = httpx.Client(base_url=upstream, timeout=httpx.Timeout(30.0))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)
        self._http.close()

    def wait_report(self, timeout: float) -> dict[str, Any] | None:
        self._reported.wait(timeout)
        with self.lock:
            return self._report

    def stream_requests(self) -> list[StreamRequest]:
        with self.lock:
            return list(self.streams)

    # What each request gets. Each runs in the handler's thread.

    def take_report(self, body: bytes) -> None:
        report = json.loads(body)
        with self.lock:
            if self._report is None:
                self._report = report
        self._reported.set()

    def forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> httpx.Response:
        return self._http.request(method, path, headers=_forwarded(headers), content=body)

    def stream(self, path: str, headers: dict[str, str]) -> AbstractContextManager[httpx.Response]:
        return self._http.stream("GET", path, headers=headers)

    def open_stream(self, path: str, headers: dict[str, str]) -> tuple[StreamRequest, int]:
        """Record a stream request; returns it and after how many events to cut it (0: never)."""
        request = StreamRequest(path, headers.get("last-event-id"), time.time())
        with self.lock:
            first = not self.streams
            self.streams.append(request)
        return request, self.cut_after if first else 0

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return type("Handler", (_Handler,), {"page": self})


class _Handler(BaseHTTPRequestHandler):
    """One request to the page server; `page` is set on a subclass per server."""

    page: ClassVar[SsePageServer]

    protocol_version = "HTTP/1.1"  # chunked stream bodies, as the API sends them

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._note()
        route = urlsplit(self.path).path
        if route == "/":
            self._send(200, "text/html; charset=utf-8", PAGE_HTML)
        elif route == "/page.js":
            self._send(200, "text/javascript; charset=utf-8", PAGE_JS)
        elif route == "/job.json":
            self._send(200, "application/json", json.dumps(self.page.job).encode())
        elif route.startswith("/tasks/") and route.endswith("/stream"):
            self._stream()
        elif route.startswith("/tasks/"):
            self._relay(b"")
        else:
            self._send(404, "text/plain", b"not here")

    def do_POST(self) -> None:
        self._note()
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(min(length, REPORT_MAX_BYTES))
        if self.path == "/report":
            self.page.take_report(body)
            self._send(204, None, b"")
        elif self.path.startswith("/dispatch_model"):
            self._relay(body)
        else:
            self._send(404, "text/plain", b"not here")

    def _note(self) -> None:
        with self.page.lock:
            self.page.paths.append(f"{self.command} {self.path}")

    def _headers(self) -> dict[str, str]:
        return {name.lower(): value for name, value in self.headers.items()}

    def _send(self, status: int, content_type: str | None, body: bytes) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
            self.send_header("Cache-Control", "no-store")
        if status != 204:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _relay(self, body: bytes) -> None:
        answer = self.page.forward(self.command, self.path, self._headers(), body)
        self.send_response(answer.status_code)
        for name, value in answer.headers.items():
            if name.lower() not in HOP_HEADERS:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def _stream(self) -> None:
        record, cut_after = self.page.open_stream(self.path, self._headers())
        try:
            self._relay_stream(record, cut_after)
        finally:
            record.ended = time.time()

    def _relay_stream(self, record: StreamRequest, cut_after: int) -> None:
        headers = _forwarded(self._headers())
        with self.page.stream(self.path, headers) as answer:
            record.status = answer.status_code
            self.send_response(answer.status_code)
            for name, value in answer.headers.items():
                if name.lower() not in HOP_HEADERS:
                    self.send_header(name, value)
            if answer.status_code == 204:
                self.end_headers()
                return
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for block, event_id in _blocks(answer.iter_bytes()):
                self._chunk(block)
                if event_id is not None:
                    record.sent_ids.append(event_id)
                if cut_after and len(record.sent_ids) >= cut_after:
                    # Dropped mid-stream: no last chunk, the socket just closes.
                    record.cut = True
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
            self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def _forwarded(headers: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name not in HOP_HEADERS}


def _blocks(data: Iterator[bytes]) -> Iterator[tuple[bytes, str | None]]:
    """(block, its event id or None) for each SSE block (event, retry or comment) of `data`."""
    buffer = b""
    for piece in data:
        buffer += piece
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            yield block + b"\n\n", _event_id(block)
    if buffer:
        yield buffer, _event_id(buffer)


def _event_id(block: bytes) -> str | None:
    for line in block.split(b"\n"):
        if line.startswith(b"id:"):
            return line[3:].strip().decode()
    return None
