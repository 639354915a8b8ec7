"""Priority classes on the real stack: which queue a request lands in, 429 per class, workers
taking interactive work first, and the inversion test: sync callers are served ahead of 1,500
batch items queued before them on a slow model, and the batch keeps moving while interactive
traffic flows. How fast (interactive p99 under a batch) is `make bench`'s mixed-load scenario.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from devstack import CeleryWorker, RedisServer, Stack, TorchServe, wait_until
from shared.priorities import QUEUES, Priority
from shared.redis_state.keys import queued_key
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

INTERACTIVE, DEFAULT, BATCH = (QUEUES[p] for p in Priority)


def depths(client: redis.Redis) -> dict[str, int]:
    """Queued tasks per class (a message may carry several: shared/redis_state/keys.py)."""
    return {
        queue: int(client.get(queued_key(queue)) or 0) for queue in (INTERACTIVE, DEFAULT, BATCH)
    }


def test_each_form_lands_in_its_class_queue_and_429_is_per_class(
    stack_factory: StackFactory,
) -> None:
    stack = stack_factory.start(workers=0, env={"MAX_QUEUE_DEPTH": "3"})
    client = stack_factory.redis_server.client()
    body = {"model_name": "echo", "input": 1}
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        # A caller who waits is interactive (here it waits 0.1 s, then gets its 202).
        assert http.post("/dispatch_model", json=body, params={"wait": 0.1}).status_code == 202
        async_ = {"Prefer": "respond-async"}
        assert http.post("/dispatch_model", json=body, headers=async_).status_code == 202
        explicit = {**body, "priority": "batch"}
        assert http.post("/dispatch_model", json=explicit, headers=async_).status_code == 202
        form = http.post(
            "/dispatch_model",
            data={"model_name": "echo", "priority": "interactive"},
            files={"data": ("x.bin", b"\x00\x01", "application/octet-stream")},
            headers=async_,
        )
        assert form.status_code == 202, form.text
        raw = http.post(
            "/dispatch_model",
            params={"model_name": "echo", "priority": "batch", "wait": 0},
            content=b"raw",
            headers={"content-type": "application/octet-stream"},
        )
        assert raw.status_code == 202, raw.text
        assert depths(client) == {INTERACTIVE: 2, DEFAULT: 1, BATCH: 2}
        task = http.get(f"/tasks/{raw.json()['task_id']}").json()
        assert task["priority"] == "batch"
        bad = http.post("/dispatch_model", json={**body, "priority": "urgent"})
        assert bad.status_code == 422
        assert "priority" in bad.json()["msg"]

        # MAX_QUEUE_DEPTH (3) per class: the default class fills up, the others do not.
        assert http.post("/dispatch_model", json=body, headers=async_).status_code == 202
        assert http.post("/dispatch_model", json=body, headers=async_).status_code == 202
        full = http.post("/dispatch_model", json=body, headers=async_)
        assert full.status_code == 429
        assert "default" in full.json()["msg"]
        sync = http.post("/dispatch_model", json=body, params={"wait": 0.05})
        assert sync.status_code == 202
        batch = http.post(
            "/batches",
            json={"requests": [{"custom_id": str(i), "model_name": "echo"} for i in range(2)]},
        )
        assert batch.status_code == 429, batch.text  # 2 queued + 2 > 3
        assert depths(client) == {INTERACTIVE: 3, DEFAULT: 3, BATCH: 2}
        metrics = http.get("/metrics").text
    for queue, expected in ((INTERACTIVE, 3), (DEFAULT, 3), (BATCH, 2)):
        assert f'dispatcher_queue_depth{{queue="{queue}"}} {expected}.0' in metrics
    for priority, expected in (("interactive", 3), ("default", 3), ("batch", 2)):
        line = (
            'dispatcher_tasks_submitted_total{backend="torchserve",model="echo",'
            f'priority="{priority}"}}'
        )
        assert f"{line} {expected}.0" in metrics, metrics


def test_a_worker_takes_interactive_work_before_a_batch_backlog(
    stack_factory: StackFactory,
) -> None:
    """Everything queued first, then one worker with one slot: its first fetch is interactive."""
    stack = stack_factory.start(workers=0)
    client = stack_factory.redis_server.client()
    with httpx.Client(base_url=stack.api_url, timeout=60) as http:
        items = [{"custom_id": str(i), "model_name": "echo", "input": i} for i in range(30)]
        batch_id = http.post("/batches", json={"requests": items}).json()["batch_id"]
        default = http.post(
            "/dispatch_model", json={"model_name": "echo"}, headers={"Prefer": "respond-async"}
        ).json()["task_id"]
        interactive = http.post(
            "/dispatch_model", json={"model_name": "echo", "input": "now"}, params={"wait": 0.05}
        ).json()["task_id"]
        assert depths(client) == {INTERACTIVE: 1, DEFAULT: 1, BATCH: 30}
        worker = CeleryWorker(
            stack.env, "one", stack.api.log_path.parent / "worker-one.log", concurrency=1
        )
        stack.workers.append(worker)
        worker.start()
        view = http.get(f"/batches/{batch_id}", params={"wait": 60}).json()
        assert view["status"] == "completed", view
        started = {
            task_id: http.get(f"/tasks/{task_id}", params={"wait": 30}).json()["started_at"]
            for task_id in (interactive, default, *(f"{batch_id}-{i}" for i in range(30)))
        }
    order = sorted(started, key=lambda task_id: started[task_id])
    assert order[:2] == [interactive, default], order[:4]


@pytest.fixture(scope="module")
def mixed_stack(
    torchserve: TorchServe, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A general worker (8 slots) and a worker reserved for interactive work (4 slots)."""
    root = tmp_path_factory.mktemp("priorities")
    server = RedisServer(root / "redis")
    factory = StackFactory(server, torchserve, root)
    try:
        yield factory.start(workers=1, interactive_workers=1, webhook_consumers=0)
    finally:
        factory.stop_all()
        server.stop()


def counts(http: httpx.Client, batch_id: str) -> dict[str, int]:
    view: dict[str, Any] = http.get(f"/batches/{batch_id}").json()
    request_counts: dict[str, int] = view["request_counts"]
    return request_counts


def succeeded(http: httpx.Client, batch_id: str) -> int:
    return counts(http, batch_id)["succeeded"]


def test_sync_callers_are_answered_while_1500_batch_items_run(mixed_stack: Stack) -> None:
    """The inversion test: `slow` sleeps 20 ms on 2 TorchServe workers, so 1,500 items take 15 s
    or more; ten sync requests to `echo` meanwhile are each answered while batch items queued
    before them still wait: they overtook the backlog. Then 8 threads of sync traffic (more than
    the reserved worker's 4 slots, so the general worker serves interactive work first too) and
    both kinds of work keep finishing side by side."""
    with httpx.Client(base_url=mixed_stack.api_url, timeout=60) as http:
        items = [
            {"custom_id": f"b{i}", "model_name": "slow", "input": {"sleep": 0.02}}
            for i in range(1500)
        ]
        created = http.post("/batches", json={"requests": items})
        assert created.status_code == 202, created.text
        batch_id = created.json()["batch_id"]
        wait_until(lambda: succeeded(http, batch_id) >= 50, 60, "the batch to be running", 0.05)

        timings = []
        for i in range(10):
            queued_before = counts(http, batch_id)["queued"]
            started = time.perf_counter()
            answer = http.post("/dispatch_model", json={"model_name": "echo", "input": i})
            timings.append(time.perf_counter() - started)
            queued_after = counts(http, batch_id)["queued"]
            assert answer.status_code == 200, answer.text
            assert answer.json()["prediction_value"] == i
            # Items queued before this request had not all started when it was answered.
            assert queued_before > 0, "the batch ran out of queued items too soon"
            assert queued_after > 0, (i, queued_before, queued_after)
        view = http.get(f"/batches/{batch_id}").json()
        print(
            "\nINVERSION: 10 sync requests while the batch ran: "
            + ", ".join(f"{t * 1000:.0f}" for t in timings)
            + f" ms (max {max(timings) * 1000:.0f} ms); batch then {view['request_counts']}"
        )
        assert view["status"] == "in_progress", "the batch ended too soon to show anything"

        # No starvation the other way: batch items keep finishing under interactive load.
        stop = threading.Event()
        latencies: list[float] = []

        def sync_traffic() -> None:
            with httpx.Client(base_url=mixed_stack.api_url, timeout=60) as own:
                while not stop.is_set():
                    started = time.perf_counter()
                    response = own.post("/dispatch_model", json={"model_name": "echo"})
                    assert response.status_code == 200, response.text
                    latencies.append(time.perf_counter() - started)

        threads = [threading.Thread(target=sync_traffic) for _ in range(8)]
        before = succeeded(http, batch_id)
        window = time.perf_counter()
        for thread in threads:
            thread.start()
        try:
            # Either kind starved would never get its count while the other runs; the timeout
            # only bounds a failing run (how fast is the bench's business).
            wait_until(
                lambda: succeeded(http, batch_id) - before >= 25 and len(latencies) >= 100,
                60,
                "25 batch items and 100 sync requests to finish side by side",
                0.05,
            )
            during = succeeded(http, batch_id) - before
            still = http.get(f"/batches/{batch_id}").json()["status"]
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        window = time.perf_counter() - window
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        print(
            f"PROGRESS: {during} batch items succeeded in {window:.1f} s under 8 sync clients "
            f"({len(latencies)} sync requests, p50 {statistics.median(latencies) * 1000:.0f} ms, "
            f"p99 {p99 * 1000:.0f} ms)"
        )
        assert during >= 25, "batch work starved by interactive traffic"
        assert len(latencies) >= 100
        assert still == "in_progress", "the batch ended: the sync traffic ran against no backlog"
        http.delete(f"/batches/{batch_id}")  # the rest is not needed
