"""What kombu loses, the reconciler restores (issue 19), on the real stack: API, Celery workers,
TorchServe, a private redis-server. The loss is made by hand, as kombu's gaps make it: a
message deleted from its queue while no worker consumes (an LPUSH a failover dropped), and a
running task's worker SIGKILLed with its unacked entry removed (the BRPOP kept, the unacked
write lost). Each task still succeeds with its own answer, its deliveries counted, the
reconciled counter on the worker that pushed it again."""

from __future__ import annotations

import json
import re
import socket
import uuid
from typing import Any

import httpx
import pytest
from kombu.transport.redis import Channel

from devstack import CeleryWorker, RedisServer, free_port, wait_until
from tests.support.faults import records, submit, wait_terminal
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

# Rounds every second, a task lost once accepted a second ago; dead workers known in 3 s.
FAST = {
    "RECONCILE_AFTER_SECONDS": "1",
    "RECONCILE_PERIOD_SECONDS": "1",
    "WORKER_HEARTBEAT_INTERVAL": "1",
    "BROKER_VISIBILITY_TIMEOUT": "300",  # kombu's own restore stays out of the way
    "DISPATCH_DEFAULT_TIMEOUT": "120",
}
METRIC = re.compile(r'^dispatcher_tasks_reconciled_total\{priority="(\w+)"\} ([0-9.]+)$', re.M)


def reconciled(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {priority: float(value) for priority, value in METRIC.findall(text)}


def worker(env: dict[str, str], name: str, factory: StackFactory) -> tuple[CeleryWorker, int]:
    port = free_port()
    metrics = {"WORKER_METRICS_PORT": str(port), "WORKER_METRICS_HOST": "127.0.0.1"}
    started = CeleryWorker({**env, **metrics}, name, factory.log_root / f"{name}.log").start()
    return started, port


def answer(http: httpx.Client, task_id: str) -> dict[str, Any]:
    view: dict[str, Any] = http.get(f"/tasks/{task_id}").json()
    return view


def test_a_message_deleted_from_its_queue_is_enqueued_again_and_runs_once(
    dedicated_redis: RedisServer, stack_factory: StackFactory
) -> None:
    env = {"REDIS_URL": dedicated_redis.url, **FAST}
    stack = stack_factory.start(workers=0, env=env)  # nobody consumes yet
    client = dedicated_redis.client()
    run = uuid.uuid4().hex[:8]
    with httpx.Client(base_url=stack.api_url, timeout=10) as http:
        bodies = {
            submit(http, {"model_name": "slow", "input": {"sleep": 0, "tag": f"{run}-{i}"}}): i
            for i in range(3)
        }
        assert client.llen("dispatch") >= 1
        client.delete("dispatch")  # every message of the three: lost
        replacement, port = worker(stack.env, "worker1", stack_factory)
        stack.workers.append(replacement)
        final = wait_terminal(client, bodies, timeout=60)
        for task_id, i in bodies.items():
            view = answer(http, task_id)
            assert view["status"] == "succeeded", view
            assert view["prediction_value"] == {
                "slept": 0.0,
                "echo": {"sleep": 0, "tag": f"{run}-{i}"},
            }
            assert view["deliveries"] == 1  # the lost message never ran: this is its one run
            assert final[task_id]["reconciled"] == "1"
    assert reconciled(port) == {"default": 3.0}
    assert client.zcard("dispatch:open") == 0
    assert client.keys("dispatch:message:*") == []


def test_a_running_task_whose_worker_died_without_an_unacked_entry_runs_again(
    dedicated_redis: RedisServer, stack_factory: StackFactory
) -> None:
    env = {"REDIS_URL": dedicated_redis.url, **FAST}
    stack = stack_factory.start(workers=1, env=env)
    client = dedicated_redis.client()
    victim_name = f"{stack.workers[0].name}@{socket.gethostname()}"
    run = uuid.uuid4().hex[:8]
    body = {"sleep": 3, "tag": run}
    with httpx.Client(base_url=stack.api_url, timeout=10) as http:
        task_id = submit(http, {"model_name": "slow", "input": body})

        def running() -> bool:
            fields = records(client, [task_id])[task_id]
            return fields.get("status") == "running" and fields.get("worker") == victim_name

        wait_until(running, 30, "the task running on worker1")
        stack.workers[0].kill()  # SIGKILL: no ack, no requeue
        # Kombu's unacked write lost (a failover kept the BRPOP only): nothing will restore it.
        held = client.hgetall(Channel.unacked_key)
        assert [json.loads(raw)[0]["headers"]["id"] for raw in held.values()] == [task_id]
        client.delete(Channel.unacked_key, Channel.unacked_index_key)
        assert client.llen("dispatch") == 0
        replacement, port = worker(stack.env, "worker2", stack_factory)
        stack.workers.append(replacement)
        final = wait_terminal(client, [task_id], timeout=60)[task_id]
        view = answer(http, task_id)
    assert view["status"] == "succeeded", view
    assert view["prediction_value"] == {"slept": 3.0, "echo": body}
    assert view["deliveries"] == 2  # the victim's run and the one after the reconcile
    assert final["worker"] == f"worker2@{socket.gethostname()}"
    assert final["reconciled"] == "1"
    assert reconciled(port) == {"default": 1.0}
