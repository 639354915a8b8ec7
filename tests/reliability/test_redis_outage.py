"""Redis outage: the API answers 503 at once while Redis is down, and everything carries on after.

A private redis-server with AOF on is stopped (SIGTERM, as a restart or an upgrade would) while
tasks are queued, prefetched and running, then started again on the same port. Neither the API
nor the worker is restarted.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from devstack import RedisServer, wait_until
from shared.redis_state.keys import TASK_KEY_PREFIX
from tests.support.faults import model_calls, submit, wait_terminal
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

TASKS = 40
ENV = {
    "BROKER_VISIBILITY_TIMEOUT": "6",
    "WORKER_HEARTBEAT_INTERVAL": "1",
    "DISPATCH_DEFAULT_TIMEOUT": "120",
}


def _timed(call: object) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()  # type: ignore[operator]
    return response, time.monotonic() - started


def test_redis_outage_answers_503_then_carries_on(
    dedicated_redis: RedisServer,
    stack_factory: StackFactory,
    counting_log: Path,
    request: pytest.FixtureRequest,
) -> None:
    stack = stack_factory.start(
        workers=1, concurrency=4, env={"REDIS_URL": dedicated_redis.url, **ENV}
    )
    client = dedicated_redis.client()
    run = uuid.uuid4().hex[:10]
    http = httpx.Client(base_url=stack.api_url, timeout=30)
    request.addfinalizer(http.close)  # also when an assertion fails before the end
    wait_until(lambda: http.get("/ready").status_code == 200, 15, "ready before the outage")
    assert http.post("/dispatch_model", json={"model_name": "echo", "input": 1}).status_code == 200

    # Queued, prefetched and running work when Redis goes away.
    ids = [
        submit(http, {"model_name": "counting", "input": {"id": f"{run}-{i}", "sleep": 0.1}})
        for i in range(TASKS)
    ]
    waited: dict[str, httpx.Response] = {}

    def sync_waiter() -> None:  # a synchronous client whose wait runs out during the outage
        body = {"model_name": "counting", "input": {"id": f"{run}-sync", "sleep": 0.1}}
        waited["response"] = http.post("/dispatch_model", json=body, headers={"Prefer": "wait=2"})

    wait_until(lambda: model_calls(counting_log, run).total() >= 5, 15, "tasks running")
    waiter = threading.Thread(target=sync_waiter)
    waiter.start()
    # Its task is queued behind the backlog (its record is written) before Redis goes.
    wait_until(
        lambda: len(list(client.scan_iter(TASK_KEY_PREFIX + "*"))) == TASKS + 2, 5, "sync task"
    )

    dedicated_redis.stop()
    stopped_at = time.monotonic()
    outage = {
        "dispatch": _timed(lambda: http.post("/dispatch_model", json={"model_name": "echo"})),
        "dispatch again": _timed(lambda: http.post("/dispatch_model", json={"model_name": "echo"})),
        "task": _timed(lambda: http.get(f"/tasks/{ids[0]}")),
        "cancel": _timed(lambda: http.delete(f"/tasks/{ids[-1]}")),
        "ready": _timed(lambda: http.get("/ready")),
    }
    health = http.get("/health")
    waiter.join(10)
    time.sleep(max(0.0, 3 - (time.monotonic() - stopped_at)))  # Redis stays down for ~3 s

    dedicated_redis.start()  # same port, same data directory: the AOF brings the queue back
    restarted_at = time.monotonic()
    accepting = {"json": {"model_name": "echo"}, "params": {"wait": 0}}
    first_ok = wait_until(
        lambda: http.post("/dispatch_model", **accepting).status_code == 202,  # type: ignore[arg-type]
        30,
        "API accepting again",
    )
    api_back = time.monotonic() - restarted_at
    final = wait_terminal(client, ids, timeout=60)
    backlog_done = time.monotonic() - restarted_at
    # Work submitted after the reconnect is consumed too (celery#8030: workers that stop).
    fresh = [submit(http, {"model_name": "echo", "input": {"fresh": i}}) for i in range(20)]
    fresh_final = wait_terminal(client, fresh, timeout=20)
    fresh_done = time.monotonic() - restarted_at
    wait_until(lambda: http.get("/ready").status_code == 200, 20, "ready after the outage")
    ready_back = time.monotonic() - restarted_at
    sync_response = waited["response"]
    sync_id = sync_response.json().get("task_id")
    sync_final = http.get(f"/tasks/{sync_id}", params={"wait": 20}).json() if sync_id else {}
    http.close()

    calls = model_calls(counting_log, run)
    statuses = Counter(f["status"] for f in final.values())
    print(
        f"\nREDIS OUTAGE: submitted={TASKS}+1 sync statuses={dict(statuses)} lost=0 "
        f"ran_twice={sum(1 for c in calls.values() if c > 1)} "
        f"503 in {max(t for _, t in outage.values()):.2f}s max; after restart: API "
        f"{api_back:.1f}s, backlog done {backlog_done:.1f}s, fresh tasks {fresh_done:.1f}s, "
        f"/ready {ready_back:.1f}s; sync waiter got {sync_response.status_code}"
    )
    for name, (response, seconds) in outage.items():
        assert response.status_code == 503, (name, response.text)
        assert seconds < 2, (name, seconds)
        if name != "ready":
            assert response.json()["code"] == "queue_unavailable", (name, response.text)
            assert "Redis" in response.json()["msg"]
    ready = outage["ready"][0].json()
    assert ready["ready"] is False
    assert ready["checks"]["redis"].startswith("unreachable")
    assert health.status_code == 200
    assert first_ok
    assert statuses == {"succeeded": TASKS}
    assert set(calls) >= {f"{run}-{i}" for i in range(TASKS)}
    assert max(calls.values()) <= 2
    assert {f["status"] for f in fresh_final.values()} == {"succeeded"}
    # The synchronous client's wait ran out while Redis was down: 503 naming its task, which
    # completed afterwards.
    assert sync_response.status_code == 503, sync_response.text
    assert sync_response.json()["code"] == "queue_unavailable"
    assert sync_response.json()["task_id"] == sync_id
    assert sync_final["status"] == "succeeded"
