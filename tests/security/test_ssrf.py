"""No server-side request forgery: only allow-listed targets, no redirects, no path escapes.

A tiny HTTP server on an allow-listed port stands in for a TorchServe: it records every request
and answers some with redirects to a second listener, which must never be reached.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from devstack import RedisServer, TorchServe
from shared.celery_app import QUEUE, encode_message
from shared.models import PredictionCall
from shared.priorities import Priority
from shared.redis_state.keys import task_key
from tests.support.faults import wait_terminal
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e


class Listener:
    """Accepts and counts TCP connections (the redirect target, or a forbidden host)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


class FakeTorchServe:
    """Answers /predictions/redirect<code> with that redirect to `target`, anything else 200."""

    def __init__(self, target: str) -> None:
        self.paths: list[str] = []
        seen, location = self.paths, target

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                seen.append(self.path)
                self.rfile.read(int(self.headers.get("content-length", 0)))
                name = self.path.split("/")[2] if self.path.count("/") >= 2 else ""
                if name.startswith("redirect"):
                    self.send_response(int(name.removeprefix("redirect")))
                    self.send_header("Location", location + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def forbidden() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def fake(forbidden: Listener) -> Iterator[FakeTorchServe]:
    server = FakeTorchServe(f"http://127.0.0.1:{forbidden.port}")
    yield server
    server.close()


@pytest.fixture(scope="module")
def ssrf_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("ssrf-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def http(
    redis_server: RedisServer,
    torchserve: TorchServe,
    ssrf_redis: RedisServer,
    fake: FakeTorchServe,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[httpx.Client]:
    env = {
        "REDIS_URL": ssrf_redis.url,
        "TORCHSERVE_ALLOWED_TARGETS": f"http://127.0.0.1:{fake.port}",
        "RETRY_MAX_ATTEMPTS": "2",
    }
    factory = StackFactory(redis_server, torchserve, tmp_path_factory.mktemp("ssrf"))
    with factory.client(env=env) as client:
        yield client


@pytest.fixture(autouse=True)
def _fresh_counts(fake: FakeTorchServe, forbidden: Listener) -> None:
    fake.paths.clear()
    forbidden.connections = 0


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirects_are_not_followed(
    http: httpx.Client, fake: FakeTorchServe, forbidden: Listener, code: int
) -> None:
    body = {"model_name": f"redirect{code}", "host": "127.0.0.1", "port": fake.port}
    response = http.post("/dispatch_model", json=body)
    time.sleep(0.3)  # a worker that followed the redirect would have connected by now
    assert response.status_code == 502, response.text
    assert response.json()["code"] == "torchserve_error"
    assert "redirect" in response.json()["msg"]
    assert "not followed" in response.json()["msg"]
    assert fake.paths == [f"/predictions/redirect{code}"]
    assert forbidden.connections == 0


def test_model_names_cannot_leave_predictions(http: httpx.Client, fake: FakeTorchServe) -> None:
    target = {"host": "127.0.0.1", "port": fake.port}
    allowed = [("a..", None), (".hidden", None), ("-x", "1.0"), ("x.y", "..a"), ("_", "-")]
    for name, version in allowed:
        response = http.post(
            "/dispatch_model", json={"model_name": name, "model_version": version, **target}
        )
        assert response.status_code == 200, response.text
    refused = ["..", ".", "../models", "a/b", "%2e%2e", "..%2fmodels", "a\\b", "a?b", "a#b", "a;b"]
    for name in refused:
        response = http.post("/dispatch_model", json={"model_name": name, **target})
        assert response.status_code == 422, (name, response.text)
        response = http.post(
            "/dispatch_model", json={"model_name": "ok", "model_version": name, **target}
        )
        assert response.status_code == 422, (name, response.text)
    expected = [f"/predictions/{n}" + (f"/{v}" if v else "") for n, v in allowed]
    assert fake.paths == expected  # exactly these paths, nothing else, nothing normalized


@pytest.mark.parametrize(
    "target",
    [
        {"host": "localhost"},  # same machine, but not the allow-listed origin
        {"http_protocol": "https"},
        {"host": "[::1]"},
        {"host": "0.0.0.0"},
        {"host": "127.1"},
        {"host": "2130706433"},
        {"host": "169.254.169.254", "port": 80},
        {"host": "127.0.0.1", "port": "forbidden"},
    ],
)
def test_targets_off_the_allow_list_are_403_and_not_contacted(
    http: httpx.Client,
    fake: FakeTorchServe,
    forbidden: Listener,
    target: dict[str, object],
) -> None:
    body: dict[str, object] = {"model_name": "echo", "port": fake.port, **target}
    if body["port"] == "forbidden":
        body["port"] = forbidden.port
    response = http.post("/dispatch_model", json=body)
    time.sleep(0.2)
    assert response.status_code == 403, response.text
    assert response.json()["code"] == "target_not_allowed"
    assert "TORCHSERVE_ALLOWED_TARGETS" in response.json()["msg"]
    assert fake.paths == []
    assert forbidden.connections == 0


def test_worker_refuses_a_forged_message_for_another_target(
    ssrf_redis: RedisServer, http: httpx.Client, forbidden: Listener
) -> None:
    """Defense in depth: a message pushed straight into Redis cannot send a worker elsewhere."""
    task_id = str(uuid.uuid4())
    now = time.time()
    call = PredictionCall(
        origin=f"http://127.0.0.1:{forbidden.port}",
        model_name="echo",
        model_version=None,
        body={},
        deadline=now + 30,
        submitted_at=now,
        priority=Priority.default,
    )
    client = ssrf_redis.client()
    client.hset(
        task_key(task_id),
        mapping={
            "status": "queued",
            "model_name": "echo",
            "model_version": "",
            "created_at": now,
            "deadline": now + 30,
            "owner": "",
            "origin": call.origin,
            "priority": "default",
        },
    )
    client.lpush(QUEUE, encode_message([{"id": task_id, "call": call.model_dump(), "headers": {}}]))
    final = wait_terminal(client, [task_id], timeout=15)[task_id]
    view = http.get(f"/tasks/{task_id}").json()
    assert final["status"] == "failed"
    assert view["error"]["code"] == "target_not_allowed"
    assert forbidden.connections == 0
