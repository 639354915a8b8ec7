"""A task that runs longer than the broker's visibility timeout reaches TorchServe exactly once.

Redis has no acks: kombu redelivers an unacknowledged message once it has been out longer than
BROKER_VISIBILITY_TIMEOUT. Workers renew the lease of every message they hold each heartbeat
(worker/heartbeat.py), so a long task is not delivered a second time while its worker lives.
Without the renewal this test sees a second model call about one timeout in.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support.faults import model_calls, records
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

VISIBILITY_TIMEOUT = 3
MODEL_SLEEP = 3 * VISIBILITY_TIMEOUT  # three leases long: several unacked sweeps (every 1 s) pass
ENV = {
    "BROKER_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
    "WORKER_HEARTBEAT_INTERVAL": "1",
    "DISPATCH_DEFAULT_TIMEOUT": "120",
    "TORCHSERVE_READ_TIMEOUT": "60",
}


def test_task_longer_than_the_visibility_timeout_runs_once(
    stack_factory: StackFactory, counting_log: Path
) -> None:
    # Two workers: a redelivered message could go to the idle one and run in parallel.
    stack = stack_factory.start(workers=2, concurrency=2, env=ENV)
    client = stack_factory.redis_server.client()
    run = uuid.uuid4().hex[:10]
    body = {"model_name": "counting", "input": {"id": f"{run}-long", "sleep": MODEL_SLEEP}}
    with httpx.Client(base_url=stack.api_url, timeout=MODEL_SLEEP + 30) as http:
        started = time.monotonic()
        response = http.post("/dispatch_model", json=body, headers={"Prefer": "wait=60"})
        took = time.monotonic() - started
        task_id = response.json().get("task_id")
        # A second delivery would be queued in TorchServe behind the first call (one model
        # worker): give it a visibility timeout and a sweep to show up before counting.
        time.sleep(VISIBILITY_TIMEOUT + 2)
    record = records(client, [task_id])[task_id]
    calls = model_calls(counting_log, run)
    print(
        f"\nLONG TASK: ran {took:.1f}s with a {VISIBILITY_TIMEOUT}s visibility timeout; "
        f"model calls={calls.total()} deliveries={record.get('deliveries')} "
        f"status={record.get('status')}"
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"
    assert took > MODEL_SLEEP  # it really outlived the lease, three times over
    assert calls == {f"{run}-long": 1}
    assert record["deliveries"] == "1"
