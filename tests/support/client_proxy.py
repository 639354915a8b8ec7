"""A tiny HTTP proxy in front of the API that injects a 503, for dispatcher_client's retry tests."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

# Not forwarded: per-hop headers, and the encoding of a body httpx has already decoded.
HOP_HEADERS = {
    "connection",
    "transfer-encoding",
    "content-length",
    "content-encoding",
    "keep-alive",
    "host",
}


class InjectingProxy:
    """Forwards to the API; the first `POST /dispatch_model` is answered 503 + Retry-After: 1,
    either at once (`forward_first=False`: nothing ran) or after forwarding it and dropping
    the real answer (`True`: the task ran, its answer was lost on the way)."""

    def __init__(self, upstream: str, forward_first: bool) -> None:
        self.upstream = httpx.Client(base_url=upstream, timeout=60)
        self.forward_first = forward_first
        self.posts: list[tuple[str, int, str | None]] = []  # key, status sent, replayed?
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """What to send back for one request (status, headers, body)."""
        post = method == "POST" and path.startswith("/dispatch_model")
        with self.lock:
            inject = post and not self.posts
        upstream: httpx.Response | None = None
        if not inject or self.forward_first:
            forwarded = {k: v for k, v in headers.items() if k.lower() not in HOP_HEADERS}
            upstream = self.upstream.request(method, path, headers=forwarded, content=body)
        if inject:
            status, out, content = 503, {"Retry-After": "1"}, b"upstream overloaded"
        else:
            assert upstream is not None
            status, out, content = upstream.status_code, dict(upstream.headers), upstream.content
        if post:
            replayed = None if inject else out.get("idempotent-replayed")
            with self.lock:
                self.posts.append((headers.get("idempotency-key", ""), status, replayed))
        return status, out, content

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                self._forward()

            def do_POST(self) -> None:
                self._forward()

            def do_DELETE(self) -> None:
                self._forward()

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {name.lower(): value for name, value in self.headers.items()}
                status, out, content = proxy.answer(self.command, self.path, headers, body)
                self.send_response(status)
                for name, value in out.items():
                    if name.lower() not in HOP_HEADERS:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        return Handler

    def __enter__(self) -> InjectingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        self.upstream.close()
