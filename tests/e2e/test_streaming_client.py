"""The Python client's `Dispatcher.stream` on the real stack (issue 18), and its own resume.

`stream()` must yield what the service streams: the same events (kind, id, data) a plain SSE
read of the task gets (tests/support/sse_reader.py), with `done` carrying the final task. And it
resumes by itself when the server side drops the connection: a small proxy here forwards to
the API and cuts the first stream response after a few events, as a dying server or proxy does
(the chunked body stops, the socket closes); the client must reconnect with `Last-Event-ID`
and still yield every event exactly once. (tests/support/client_proxy.py buffers whole answers
and cannot cut a stream.)
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self

import httpx
import pytest
from dispatcher_client import Dispatcher, StreamEvent

from devstack import Stack
from tests.support.sse_reader import Reading, event_ms, read_events

pytestmark = pytest.mark.e2e

CHUNKS, DELAY = 16, 0.3
INPUT = {"chunks": CHUNKS, "delay": DELAY}
CUT_AFTER = 3
HOP_HEADERS = frozenset(
    {"connection", "transfer-encoding", "content-length", "content-encoding", "keep-alive", "host"}
)


@dataclass
class StreamRequest:
    """One stream request the proxy forwarded: the id it resumed from, what it passed on."""

    last_event_id: str | None
    started: float
    status: int = 0
    ids: list[str] = field(default_factory=list)
    cut: bool = False


class CuttingProxy:
    """Forwards every request to `upstream`; cuts the first stream response after `cut_after`
    events. `streams` records each stream request."""

    def __init__(self, upstream: str, cut_after: int) -> None:
        self.cut_after = cut_after
        self.streams: list[StreamRequest] = []
        self.lock = threading.Lock()
        self.http = httpx.Client(base_url=upstream, timeout=30)
        handler = type("Handler", (_Handler,), {"proxy": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
        self.http.close()


class _Handler(BaseHTTPRequestHandler):
    proxy: ClassVar[CuttingProxy]
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked stream bodies as the API sends them

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        if self.path.split("?")[0].endswith("/stream"):
            self._stream()
        else:
            self._relay()

    def do_POST(self) -> None:
        self._relay()

    def _headers(self) -> dict[str, str]:
        return {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}

    def _start(self, answer: httpx.Response) -> None:
        self.send_response(answer.status_code)
        for name, value in answer.headers.items():
            if name.lower() not in HOP_HEADERS:
                self.send_header(name, value)

    def _relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        answer = self.proxy.http.request(
            self.command, self.path, headers=self._headers(), content=body
        )
        self._start(answer)
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def _stream(self) -> None:
        record = StreamRequest(self.headers.get("last-event-id"), time.time())
        with self.proxy.lock:
            cut_after = 0 if self.proxy.streams else self.proxy.cut_after
            self.proxy.streams.append(record)
        with self.proxy.http.stream("GET", self.path, headers=self._headers()) as answer:
            record.status = answer.status_code
            self._start(answer)
            if answer.status_code == 204:
                self.end_headers()
                return
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            buffer = b""
            for piece in answer.iter_bytes():
                buffer += piece
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    self.wfile.write(b"%x\r\n%s\n\n\r\n" % (len(block) + 2, block))
                    self.wfile.flush()
                    for line in block.split(b"\n"):
                        if line.startswith(b"id:"):
                            record.ids.append(line[3:].strip().decode())
                    if cut_after and len(record.ids) >= cut_after:
                        record.cut = True  # no last chunk: the socket just closes
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
            if buffer:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(buffer), buffer))
            self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def history_of(stack: Stack) -> Iterator[Any]:
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:

        def read(task_id: str) -> Reading:
            return read_events(http, f"/tasks/{task_id}/stream")

        yield read


def same(events: list[StreamEvent], history: Reading) -> None:
    """The client's events are the stream's: kind, id and data (parsed), in order, once."""
    assert [(e.kind, e.id) for e in events] == [(e.kind, e.id) for e in history.events]
    assert [e.data for e in events] == [e.json() for e in history.events]
    assert [e.kind for e in events] == ["output"] * CHUNKS + ["done"]
    assert [e.data["i"] for e in events[:-1]] == list(range(CHUNKS))


def check_done(event: StreamEvent, task_id: str) -> None:
    assert event.final
    assert event.task is not None
    assert event.task.task_id == task_id
    assert event.task.status == "succeeded"
    pieces = event.task.prediction_value.splitlines()
    assert len(pieces) == CHUNKS


def test_stream_yields_the_events_the_service_streams(stack: Stack, history_of: Any) -> None:
    with Dispatcher(stack.api_url, timeout=30) as client:
        stream = client.stream("streaming", INPUT)
        events = list(stream)
        check_done(events[-1], stream.task_id)
        same(events, history_of(stream.task_id))
        # Following the task elsewhere, after an event seen before: the rest, once.
        rest = list(client.stream(task_id=stream.task_id, last_event_id=events[3].id))
    assert [(e.kind, e.id, e.data) for e in rest] == [(e.kind, e.id, e.data) for e in events[4:]]


def test_stream_resumes_by_itself_after_the_server_drops_it(stack: Stack, history_of: Any) -> None:
    with (
        CuttingProxy(stack.api_url, CUT_AFTER) as proxy,
        Dispatcher(proxy.url, timeout=30) as client,
    ):
        stream = client.stream("streaming", INPUT)
        events = list(stream)
    check_done(events[-1], stream.task_id)
    history = history_of(stream.task_id)
    same(events, history)
    # One cut, one reconnect by the client with the id of the last event it had.
    first, resumed = proxy.streams
    assert (first.last_event_id, first.status, first.cut) == (None, 200, True)
    assert first.ids == [e.id for e in events[:CUT_AFTER]]
    assert resumed.last_event_id == events[CUT_AFTER - 1].id
    assert (resumed.status, resumed.cut) == (200, False)
    assert resumed.ids == [e.id for e in events[CUT_AFTER:]]
    # It came back while the model was still producing (after the API's `retry:`, 2 s).
    assert resumed.started < event_ms(history.outputs[-1].id), (resumed.started, history.ids)
