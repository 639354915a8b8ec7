"""Redis that answers but refuses writes: out of memory under `noeviction`, or a read-only replica.

Unlike an outage, every read still works, so nothing fails fast on a connection error: each write
(the submit script, cancel, the workers' START/FINISH transitions, kombu's unacked bookkeeping,
the heartbeat's lease renewal) gets an error reply instead. The API must answer 503
`queue_unavailable` saying why, write nothing half-way, and once Redis accepts writes again every
accepted task must finish by itself: workers neither crash nor acknowledge a task they could not
record.

The read-only case is a failover as the service sees it: its REDIS_URL now points at a replica.
The test's redis-server is made a replica of a second, password-protected redis-server it cannot
authenticate to, so the replication handshake never completes and its data stays as it was (a
replica that did sync would replace its data with the primary's); `REPLICAOF NO ONE` promotes it
back.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from devstack import RedisServer, wait_until
from shared.celery_app import QUEUE
from shared.errors import redis_write_refusal
from shared.redis_state.keys import TASK_KEY_PREFIX
from tests.support.faults import model_calls, submit, wait_terminal
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

TASKS = 24
MODEL_SLEEP = 0.1
REFUSED_FOR = 5.0  # longer than a heartbeat, a kombu restore sweep and the in-process retries
ENV = {
    "BROKER_VISIBILITY_TIMEOUT": "6",
    "WORKER_HEARTBEAT_INTERVAL": "1",
    "DISPATCH_DEFAULT_TIMEOUT": "120",
    "WORKER_LOG_TASKS": "true",
}

Condition = Callable[[redis.Redis, Path], AbstractContextManager[str]]


@contextmanager
def out_of_memory(client: redis.Redis, _: Path) -> Iterator[str]:
    """`maxmemory` below what Redis uses, policy noeviction: every write that may grow is refused.

    Set a margin under `used_memory` rather than at it: the workers' pops free a little memory,
    and a limit exactly at the current use would let some writes through.
    """
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", used // 2)
    try:
        yield "out of memory"
    finally:
        client.config_set("maxmemory", 0)


@contextmanager
def read_only_replica(client: redis.Redis, workdir: Path) -> Iterator[str]:
    """REPLICAOF another (password-protected) redis-server, then REPLICAOF NO ONE."""
    with RedisServer(workdir / "primary", appendonly=False, password=uuid.uuid4().hex) as primary:
        client.execute_command("REPLICAOF", "127.0.0.1", str(primary.port))
        try:
            yield "read-only replica"
        finally:
            client.execute_command("REPLICAOF", "NO", "ONE")


def _task_keys(client: redis.Redis) -> set[bytes]:
    return set(client.scan_iter(TASK_KEY_PREFIX + "*", count=1000))


@pytest.mark.parametrize("condition", [out_of_memory, read_only_replica], ids=["oom", "replica"])
def test_redis_refusing_writes_answers_503_and_recovers_by_itself(
    condition: Condition, stack_factory: StackFactory, counting_log: Path, tmp_path: Path
) -> None:
    stack = stack_factory.start(workers=1, concurrency=4, env=ENV)
    worker = stack.workers[0]
    client = stack_factory.redis_server.client()
    run = uuid.uuid4().hex[:10]
    http = httpx.Client(base_url=stack.api_url, timeout=30)
    wait_until(lambda: http.get("/ready").status_code == 200, 15, "ready before the refusal")

    # Running, prefetched and queued work when Redis starts refusing writes.
    ids = [
        submit(
            http, {"model_name": "counting", "input": {"id": f"{run}-{i}", "sleep": MODEL_SLEEP}}
        )
        for i in range(TASKS)
    ]
    wait_until(lambda: model_calls(counting_log, run).total() >= 3, 15, "tasks running")

    with condition(client, tmp_path) as why:
        refused_at = time.monotonic()
        keys_before, depth_before = _task_keys(client), client.llen(QUEUE)
        submitted = http.post("/dispatch_model", json={"model_name": "echo", "input": 1})
        sync = http.post(
            "/dispatch_model", json={"model_name": "echo", "input": 2}, headers={"Prefer": "wait=5"}
        )
        canceled = http.delete(f"/tasks/{ids[-1]}")
        read = http.get(f"/tasks/{ids[0]}")
        ready = http.get("/ready")
        keys_during, depth_during = _task_keys(client), client.llen(QUEUE)
        time.sleep(max(0.0, REFUSED_FOR - (time.monotonic() - refused_at)))
        worker_alive_during = worker.alive

    accepted_at = time.monotonic()
    after = submit(http, {"model_name": "counting", "input": {"id": f"{run}-after"}})
    final = wait_terminal(client, [*ids, after], timeout=60)
    all_done = time.monotonic() - accepted_at
    wait_until(lambda: http.get("/ready").status_code == 200, 20, "ready again")
    ready_again = time.monotonic() - accepted_at
    http.close()

    calls = model_calls(counting_log, run)
    statuses = Counter(f["status"] for f in final.values())
    print(
        f"\nREDIS REFUSES WRITES ({why}): submitted={TASKS}+1 statuses={dict(statuses)} "
        f"ran_twice={sum(1 for c in calls.values() if c > 1)} refused for {REFUSED_FOR:g}s; "
        f"after: all done in {all_done:.1f}s, /ready 200 in {ready_again:.1f}s; "
        f"submit={submitted.status_code} {submitted.json()} ready={ready.json()}"
    )
    for response in (submitted, sync, canceled):
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["code"] == "queue_unavailable", body
        assert "refuses writes" in body["msg"], body
        assert why in body["msg"], body
    assert read.status_code == 200, read.text  # reads still work
    assert ready.status_code == 503
    assert why in ready.json()["checks"]["redis"], ready.json()
    # Nothing half-written: no record without its message, no message without its record.
    assert keys_during <= keys_before
    assert depth_during <= depth_before
    assert worker_alive_during
    assert worker.alive
    assert statuses == {"succeeded": TASKS + 1}, statuses
    assert set(calls) == {f"{run}-{i}" for i in range(TASKS)} | {f"{run}-after"}
    assert max(calls.values()) <= 2


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (
            redis.exceptions.OutOfMemoryError(
                "command not allowed when used memory > 'maxmemory'."
            ),
            "out of memory",
        ),
        (
            redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
            "read-only",
        ),
        # Redis 6 wraps a refused write inside a Lua script:
        (
            redis.ResponseError(
                "Error running script (call to f_1): @user_script:3: -OOM command not allowed"
            ),
            "out of memory",
        ),
        (
            redis.ResponseError(
                "Error running script (call to f_1): @user_script:3: -READONLY You can't"
            ),
            "read-only",
        ),
        (redis.ResponseError("MISCONF Redis is configured to save RDB snapshots"), "save to disk"),
    ],
)
def test_write_refusals_are_named(reply: redis.RedisError, why: str) -> None:
    reason = redis_write_refusal(reply)
    assert reason is not None
    assert why in reason


def test_other_errors_are_not_refusals() -> None:
    assert redis_write_refusal(redis.ResponseError("WRONGTYPE Operation against a key")) is None
    assert redis_write_refusal(redis.ConnectionError("Connection refused")) is None
