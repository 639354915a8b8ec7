"""Helpers of the fault and security tests: read task records, count model calls, scan Redis,
see a process's open connections, receive webhooks."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import redis

from devstack import free_port, wait_until
from shared.redis_state.keys import TASK_KEY_PREFIX
from shared.redis_state.record import TERMINAL


def submit(http: httpx.Client, body: dict[str, Any], **headers: str) -> str:
    """POST /dispatch_model with `Prefer: respond-async`; the new task's id."""
    response = http.post(
        "/dispatch_model", json=body, headers={"Prefer": "respond-async", **headers}
    )
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def records(client: redis.Redis, task_ids: Iterable[str]) -> dict[str, dict[str, str]]:
    """Each task's record hash (decoded); {} for a task whose record is missing."""
    ids = list(task_ids)
    pipe = client.pipeline(transaction=False)
    for task_id in ids:
        pipe.hgetall(TASK_KEY_PREFIX + task_id)
    return {
        task_id: {k.decode(): v.decode() for k, v in fields.items()}
        for task_id, fields in zip(ids, pipe.execute(), strict=True)
    }


def wait_terminal(
    client: redis.Redis, task_ids: Iterable[str], timeout: float
) -> dict[str, dict[str, str]]:
    """The records once every task is terminal; raises naming the stragglers after `timeout`."""
    ids = list(task_ids)
    deadline = time.monotonic() + timeout
    while True:
        seen = records(client, ids)
        open_ = [task_id for task_id, f in seen.items() if f.get("status") not in TERMINAL]
        if not open_:
            return seen
        if time.monotonic() > deadline:
            sample = {task_id: seen[task_id].get("status", "missing") for task_id in open_[:5]}
            raise AssertionError(f"{len(open_)} tasks not terminal after {timeout}s: {sample}")
        time.sleep(0.1)


def model_calls(counting_log: Path, prefix: str) -> Counter[str]:
    """How often the `counting` model received each `input.id` that starts with `prefix`."""
    calls: Counter[str] = Counter()
    if not counting_log.exists():
        return calls
    for line in counting_log.read_text().splitlines():
        body = json.loads(line)
        if isinstance(body, dict) and str(body.get("id", "")).startswith(prefix):
            calls[str(body["id"])] += 1
    return calls


def _decoded(text: str) -> list[str]:
    """`text`, plus any base64 `body` inside a kombu message (the queue and `unacked`)."""
    found = [text]
    try:
        data = json.loads(text)
    except ValueError:
        return found
    if isinstance(data, list) and data and isinstance(data[0], str):  # unacked: [msg, ex, rk]
        return found + _decoded(data[0])
    if isinstance(data, dict) and isinstance(data.get("body"), str):
        with contextlib.suppress(binascii.Error, ValueError):
            found.append(base64.b64decode(data["body"], validate=True).decode(errors="replace"))
    return found


def redis_contents(client: redis.Redis) -> dict[str, list[str]]:
    """Every key's name and values, all types, message bodies base64-decoded, as text."""
    contents: dict[str, list[str]] = {}
    for raw_key in client.scan_iter("*", count=1000):
        kind = client.type(raw_key).decode()
        values: list[bytes] = []
        if kind == "string":
            values = [client.get(raw_key) or b""]
        elif kind == "hash":
            values = [item for pair in client.hgetall(raw_key).items() for item in pair]
        elif kind == "list":
            values = client.lrange(raw_key, 0, -1)
        elif kind == "set":
            values = list(client.smembers(raw_key))
        elif kind == "zset":
            values = [member for member, _ in client.zrange(raw_key, 0, -1, withscores=True)]
        elif kind == "stream":
            values = [
                item
                for _, fields in client.xrange(raw_key)
                for pair in fields.items()
                for item in pair
            ]
        else:
            raise AssertionError(f"unexpected Redis type {kind} of {raw_key!r}")
        texts = [raw_key.decode(errors="replace")]
        for value in values:
            texts += _decoded(value.decode(errors="replace"))
        contents[raw_key.decode(errors="replace")] = texts
    return contents


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (e.g. a prefork worker's pool processes)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children


# /proc/net/tcp's state column: 01 is ESTABLISHED.
_ESTABLISHED = "01"


def connected_ports(pid: int) -> set[int]:
    """The remote ports of `pid`'s established TCP connections (IPv4 and IPv6).

    A state a test can wait on where it would otherwise sleep: a worker child with a connection
    to TorchServe's port is inside its TorchServe call, so it has read its payload already.
    """
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = fd.readlink().as_posix()
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                columns = row.split()
                if columns[3] == _ESTABLISHED and columns[9] in inodes:
                    ports.add(int(columns[2].rsplit(":", 1)[1], 16))
    return ports


@dataclass
class HookReceiver:
    """A webhook receiver on 127.0.0.1 (a real HTTP server, not a fake of the sender): records
    every POST as (path with query, headers, body) and answers the statuses scripted for its
    path in `scripts`, then 204."""

    port: int = field(default_factory=free_port)
    scripts: dict[str, list[int]] = field(default_factory=dict)
    received: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.received.append((self.path, dict(self.headers.items()), body))
                script = receiver.scripts.get(self.path) or []
                self.send_response(script.pop(0) if script else 204)
                self.send_header("content-length", "0")
                self.end_headers()

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

    def wait(self, path: str, count: int, timeout: float) -> list[tuple[dict[str, str], bytes]]:
        """(headers, body) of the first `count` requests to `path`, once they have arrived."""

        def arrived() -> list[tuple[dict[str, str], bytes]]:
            got = [(headers, body) for where, headers, body in self.received if where == path]
            return got if len(got) >= count else []

        return wait_until(arrived, timeout, f"{count} webhook request(s) at the receiver", 0.05)
