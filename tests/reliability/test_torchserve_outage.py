"""TorchServe outages on a dedicated, real TorchServe: overloaded, down and back, down for good.

The module's TorchServe serves only `counting` with one model worker and a job queue of one, so
a handful of concurrent requests overflow it, and stopping it touches no other test.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from devstack import RedisServer, TorchServe, wait_until
from tests.support.faults import model_calls, submit, wait_terminal
from tests.support.stack import StackFactory, TorchServeFactory

pytestmark = pytest.mark.e2e

RETRIED_503 = re.compile(r"retrying .* after torchserve_unavailable")
# A retry window of ~30 s: 20 attempts, backoff 0.5 s doubling to 2 s (with jitter).
PATIENT = {
    "RETRY_MAX_ATTEMPTS": "20",
    "RETRY_BACKOFF_INITIAL": "0.5",
    "RETRY_BACKOFF_MAX": "2",
    "DISPATCH_DEFAULT_TIMEOUT": "120",
}


@pytest.fixture(scope="module")
def outage_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's own `counting` log."""
    return tmp_path_factory.mktemp("ts-outage") / "counting.jsonl"


@pytest.fixture(scope="module")
def small_torchserve(torchserve_factory: TorchServeFactory, outage_log: Path) -> TorchServe:
    return torchserve_factory.start(("counting.mar",), job_queue_size=1, counting_log=outage_log)


@pytest.fixture
def running_torchserve(small_torchserve: TorchServe) -> TorchServe:
    """The module's TorchServe, started again if an earlier test left it stopped."""
    if not small_torchserve.alive:
        small_torchserve.start()
    return small_torchserve


def _start(
    stack_factory: StackFactory,
    redis: RedisServer,
    torchserve: TorchServe,
    concurrency: int = 8,
    **env: str,
) -> str:
    full_env = {"REDIS_URL": redis.url, "TORCHSERVE_URL": torchserve.inference_url, **env}
    return stack_factory.start(workers=1, concurrency=concurrency, env=full_env).api_url


def test_torchserve_queue_full_503_is_retried_with_backoff(
    dedicated_redis: RedisServer,
    stack_factory: StackFactory,
    running_torchserve: TorchServe,
    outage_log: Path,
) -> None:
    api = _start(stack_factory, dedicated_redis, running_torchserve, concurrency=8, **PATIENT)
    run = uuid.uuid4().hex[:10]
    with httpx.Client(base_url=api, timeout=10) as http:
        ids = [
            submit(http, {"model_name": "counting", "input": {"id": f"{run}-{i}", "sleep": 0.4}})
            for i in range(8)
        ]
        started = time.monotonic()
        final = wait_terminal(dedicated_redis.client(), ids, timeout=60)
        elapsed = time.monotonic() - started
    retried = len(RETRIED_503.findall(stack_factory.logs()))
    calls = model_calls(outage_log, run)
    print(
        f"\nTORCHSERVE QUEUE FULL: submitted=8 statuses="
        f"{dict(Counter(f['status'] for f in final.values()))} 503s retried={retried} "
        f"model calls={calls.total()} done in {elapsed:.1f}s"
    )
    assert {f["status"] for f in final.values()} == {"succeeded"}
    assert retried > 0  # TorchServe did answer 503 (queue full), and the worker retried it
    assert calls == Counter({f"{run}-{i}": 1 for i in range(8)})  # a 503 never reached the model


def test_torchserve_down_and_back_within_the_retry_window(
    dedicated_redis: RedisServer,
    stack_factory: StackFactory,
    running_torchserve: TorchServe,
    outage_log: Path,
) -> None:
    # Backoff up to 3 s: a window of at least ~28 s, however slowly TorchServe restarts here.
    api = _start(
        stack_factory, dedicated_redis, running_torchserve, **{**PATIENT, "RETRY_BACKOFF_MAX": "3"}
    )
    run = uuid.uuid4().hex[:10]
    with httpx.Client(base_url=api, timeout=10) as http:
        running_torchserve.stop()
        stopped = time.monotonic()
        ids = [
            submit(http, {"model_name": "counting", "input": {"id": f"{run}-{i}"}})
            for i in range(10)
        ]
        wait_until(lambda: "after torchserve_unavailable" in stack_factory.logs(), 10, "retries")
        ready_down = http.get("/ready")
        running_torchserve.start()  # same ports; blocks until the model is READY
        back = time.monotonic()
        final = wait_terminal(dedicated_redis.client(), ids, timeout=40)
        done = time.monotonic()
    calls = model_calls(outage_log, run)
    print(
        f"\nTORCHSERVE DOWN AND BACK: submitted=10 statuses="
        f"{dict(Counter(f['status'] for f in final.values()))} lost=0 "
        f"ran_twice={sum(1 for c in calls.values() if c > 1)} down for {back - stopped:.1f}s, "
        f"all done {done - back:.1f}s after TorchServe was back"
    )
    assert {f["status"] for f in final.values()} == {"succeeded"}
    assert calls == Counter({f"{run}-{i}": 1 for i in range(10)})
    assert ready_down.status_code == 503
    assert ready_down.json()["checks"]["torchserve"].startswith("unreachable")


def test_torchserve_down_for_good_fails_bounded_with_503(
    dedicated_redis: RedisServer,
    stack_factory: StackFactory,
    running_torchserve: TorchServe,
) -> None:
    api = _start(
        stack_factory,
        dedicated_redis,
        running_torchserve,
        RETRY_MAX_ATTEMPTS="4",
        RETRY_BACKOFF_INITIAL="0.2",
        RETRY_BACKOFF_MAX="0.5",
    )
    with httpx.Client(base_url=api, timeout=30) as http:
        assert http.post("/dispatch_model", json={"model_name": "counting"}).status_code == 200
        running_torchserve.stop()
        started = time.monotonic()
        response = http.post("/dispatch_model", json={"model_name": "counting", "input": 1})
        elapsed = time.monotonic() - started
        ready = http.get("/ready")
        stored = http.get(f"/tasks/{response.json()['task_id']}").json()
    print(f"\nTORCHSERVE DOWN FOR GOOD: failed with {response.status_code} after {elapsed:.1f}s")
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["code"] == "torchserve_unavailable"
    assert running_torchserve.inference_url in body["msg"]
    assert stored["status"] == "failed"
    assert stored["error"]["code"] == "torchserve_unavailable"
    assert elapsed < 5  # 4 attempts, 3 backoffs of at most 0.5 s
    assert ready.status_code == 503
    assert ready.json()["ready"] is False
    assert ready.json()["checks"]["torchserve"].startswith("unreachable")
