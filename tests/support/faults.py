"""Helpers of the fault and security tests: read task records, count model calls, scan Redis,
see a process's open connections, receive webhooks."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import redis

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


def running(pid: int) -> bool:
    """Alive and not a zombie (this machine's init does not reap orphans)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


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
