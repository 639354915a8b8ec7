"""Deadlines and cancel, proven at the model: what expires or is canceled never reaches TorchServe.

The session TorchServe's `counting` model logs every request it receives; each test tags its
requests with a unique id and reads that log.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from devstack import CeleryWorker, RedisServer, Stack, wait_until
from tests.support.faults import model_calls, records, submit, wait_terminal
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e


def _drain(stack: Stack, http: httpx.Client, counting_log: Path, run: str) -> None:
    """Start a worker and wait until it has consumed everything queued before (FIFO)."""
    worker = CeleryWorker(stack.env, "late", stack.api.log_path.parent / "worker-late.log")
    stack.workers.append(worker)
    worker.start()
    sentinel = submit(http, {"model_name": "counting", "input": {"id": f"{run}-sentinel"}})
    view = http.get(f"/tasks/{sentinel}", params={"wait": 20}).json()
    assert view["status"] == "succeeded"
    wait_until(lambda: model_calls(counting_log, run)[f"{run}-sentinel"] == 1, 5, "sentinel")


def test_not_started_before_the_deadline_expires_and_never_reaches_torchserve(
    dedicated_redis: RedisServer, stack_factory: StackFactory, counting_log: Path
) -> None:
    stack = stack_factory.start(workers=0, env={"REDIS_URL": dedicated_redis.url})
    run = uuid.uuid4().hex[:10]
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        read_by_api = submit(
            http, {"model_name": "counting", "input": {"id": f"{run}-api"}, "timeout": 1}
        )
        left_to_worker = submit(
            http, {"model_name": "counting", "input": {"id": f"{run}-worker"}, "timeout": 1}
        )
        started = time.monotonic()
        sync = http.post(
            "/dispatch_model",
            json={"model_name": "counting", "input": {"id": f"{run}-sync"}, "timeout": 1},
        )
        sync_seconds = time.monotonic() - started
        expired = http.get(f"/tasks/{read_by_api}").json()
        assert records(dedicated_redis.client(), [left_to_worker])[left_to_worker]["status"] == (
            "queued"
        )
        _drain(stack, http, counting_log, run)
        # FIFO holds for fetching, not for finishing: the late worker's threads may end the
        # sentinel before another thread's START expired this one. Read Redis directly (an API
        # read would settle it itself) until the worker has.
        wait_until(
            lambda: (
                records(dedicated_redis.client(), [left_to_worker])[left_to_worker]["status"]
                == "expired"
            ),
            10,
            "the late worker to expire the task it took",
        )
        by_worker = http.get(f"/tasks/{left_to_worker}").json()
    print(f"\nEXPIRED: a synchronous request whose task expired in the queue: {sync_seconds:.1f}s")
    # The synchronous client hears about the expiry at its deadline, not at some later recheck.
    assert sync.status_code == 504, sync.text
    assert sync.json()["code"] == "expired"
    assert sync_seconds < 3
    for view in (expired, by_worker):
        assert view["status"] == "expired"
        assert view["error"]["code"] == "expired"
        assert view["error"]["status"] == 504
        assert view["started_at"] is None
    assert by_worker["deliveries"] == 1  # the worker took it, saw the deadline, did not run it
    assert set(model_calls(counting_log, run)) == {f"{run}-sentinel"}


def test_running_past_the_deadline_fails_with_504(
    dedicated_redis: RedisServer, stack_factory: StackFactory
) -> None:
    env = {
        "REDIS_URL": dedicated_redis.url,
        "DISPATCH_DEFAULT_TIMEOUT": "30",
        "DISPATCH_MAX_TIMEOUT": "60",
    }
    stack = stack_factory.start(workers=1, env=env)
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        started = time.monotonic()
        late = http.post(
            "/dispatch_model", json={"model_name": "slow", "input": {"sleep": 3}, "timeout": 1}
        )
        elapsed = time.monotonic() - started
        stored = http.get(f"/tasks/{late.json()['task_id']}").json()
        default = http.get(f"/tasks/{submit(http, {'model_name': 'echo'})}").json()
        too_long = http.post("/dispatch_model", json={"model_name": "echo", "timeout": 61})
    print(f"\nDEADLINE EXCEEDED: 504 after {elapsed:.1f}s for a 1 s deadline on a 3 s call")
    assert late.status_code == 504, late.text
    assert late.json()["code"] == "deadline_exceeded"
    assert elapsed < 2.5
    assert stored["status"] == "failed"
    assert stored["started_at"] is not None
    span = datetime.fromisoformat(default["deadline"]) - datetime.fromisoformat(
        default["created_at"]
    )
    assert span.total_seconds() == pytest.approx(30, abs=0.01)  # DISPATCH_DEFAULT_TIMEOUT
    assert too_long.status_code == 422
    assert "timeout" in too_long.json()["msg"]
    assert "60" in too_long.json()["msg"]


def test_cancel_queued_running_and_finished(
    dedicated_redis: RedisServer, stack_factory: StackFactory, counting_log: Path
) -> None:
    stack = stack_factory.start(workers=0, env={"REDIS_URL": dedicated_redis.url})
    run = uuid.uuid4().hex[:10]
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        queued = submit(http, {"model_name": "counting", "input": {"id": f"{run}-queued"}})
        started = time.monotonic()
        canceled = http.delete(f"/tasks/{queued}")
        cancel_seconds = time.monotonic() - started
        again = http.delete(f"/tasks/{queued}")
        _drain(stack, http, counting_log, run)
        after_drain = http.get(f"/tasks/{queued}").json()

        running = submit(http, {"model_name": "slow", "input": {"sleep": 1.5}})
        wait_until(
            lambda: http.get(f"/tasks/{running}").json()["status"] == "running", 10, "running"
        )
        flagged = http.delete(f"/tasks/{running}")
        finished = http.get(f"/tasks/{running}", params={"wait": 10}).json()
        too_late = http.delete(f"/tasks/{running}")
        unknown = http.delete(f"/tasks/{uuid.uuid4()}")
        malformed = http.delete("/tasks/not a task id")
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "canceled"
    assert canceled.json()["error"]["code"] == "canceled"
    assert cancel_seconds < 1
    assert again.status_code == 409
    assert again.json()["code"] == "task_finished"
    assert after_drain["status"] == "canceled"
    assert f"{run}-queued" not in model_calls(counting_log, run)  # never reached TorchServe

    assert flagged.status_code == 200, flagged.text
    assert flagged.json()["status"] == "running"
    assert flagged.json()["cancel_requested"] is True
    assert finished["status"] == "succeeded"  # the late result is still stored
    assert finished["prediction_value"]["slept"] == 1.5
    assert finished["cancel_requested"] is True
    assert too_late.status_code == 409
    assert "succeeded" in too_late.json()["msg"]
    assert unknown.status_code == 404
    assert malformed.status_code == 422


def test_no_task_stays_open_forever(
    dedicated_redis: RedisServer, stack_factory: StackFactory
) -> None:
    """Every task reaches a terminal state within its documented bound, even with no worker."""
    stack = stack_factory.start(workers=0, env={"REDIS_URL": dedicated_redis.url})
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        ids = [submit(http, {"model_name": "echo", "timeout": 0.5}) for _ in range(5)]
        time.sleep(0.6)
        views = [http.get(f"/tasks/{task_id}").json() for task_id in ids]
    assert {view["status"] for view in views} == {"expired"}
    final = wait_terminal(dedicated_redis.client(), ids, timeout=1)
    assert {fields["status"] for fields in final.values()} == {"expired"}
