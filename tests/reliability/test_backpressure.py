"""Backpressure and readiness without workers: a full queue answers 429 and enqueues nothing."""

from __future__ import annotations

import httpx
import pytest

from devstack import CeleryWorker, RedisServer
from shared.priorities import QUEUES, Priority
from shared.redis_state.keys import TASK_KEY_PREFIX
from tests.support.faults import submit, wait_terminal
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

DEPTH = 5
# `submit` sends `Prefer: respond-async`: the default class, whose queue MAX_QUEUE_DEPTH bounds.
QUEUE = QUEUES[Priority.default]


def test_full_queue_is_429_with_retry_after_and_nothing_enqueued(
    dedicated_redis: RedisServer, stack_factory: StackFactory
) -> None:
    env = {"REDIS_URL": dedicated_redis.url, "MAX_QUEUE_DEPTH": str(DEPTH)}
    stack = stack_factory.start(workers=0, env=env)  # nothing consumes
    client = dedicated_redis.client()

    def task_keys() -> set[bytes]:
        return set(client.scan_iter(TASK_KEY_PREFIX + "*"))

    with httpx.Client(base_url=stack.api_url, timeout=10) as http:
        not_ready = http.get("/ready")
        accepted = [submit(http, {"model_name": "echo", "input": i}) for i in range(DEPTH)]
        depth, keys = client.llen(QUEUE), task_keys()
        over = {"model_name": "echo", "input": "over", "priority": "default"}
        refused = [
            http.post("/dispatch_model", json=over),
            http.post("/dispatch_model", json={"model_name": "echo"}, params={"wait": 0}),
        ]
        assert (client.llen(QUEUE), task_keys()) == (depth, keys)

        worker = CeleryWorker(stack.env, "drain", stack.api.log_path.parent / "worker-drain.log")
        stack.workers.append(worker)
        worker.start()
        wait_terminal(client, accepted, timeout=20)
        after = http.post("/dispatch_model", json={"model_name": "echo", "input": "after"})
    assert depth == DEPTH
    assert len(keys) == DEPTH
    for response in refused:
        assert response.status_code == 429, response.text
        assert int(response.headers["retry-after"]) > 0
        body = response.json()
        assert body["code"] == "queue_full"
        assert "retry" in body["msg"]
        assert "task_id" not in body
    assert after.status_code == 200, after.text  # drained: accepted again
    assert not_ready.status_code == 503
    assert not_ready.json()["ready"] is False
    assert not_ready.json()["checks"]["redis"] == "ok"
    assert "no worker" in not_ready.json()["checks"]["workers"]
