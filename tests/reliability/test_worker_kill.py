"""Workers that die mid-flight: SIGKILL loses nothing, and a task that keeps killing is given up.

Real processes only: a private redis-server (so the dead worker's unacknowledged messages stay out
of the session's Redis), Celery workers, the API and the session's TorchServe, whose `counting`
model logs every request it receives (that is how "ran twice" is counted).
"""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from devstack import ApiServer, CeleryWorker, RedisServer, wait_until
from devstack.upstream import DELAY_ENV
from tests.support.faults import model_calls, records, submit, wait_terminal
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

# A message's id is its first task's; these sequential submits make one-task messages.
RECEIVED = re.compile(r"Task dispatch\.predict(?:_many)?\[([0-9a-f-]+)\] received")
SUCCEEDED = re.compile(r"Task dispatch\.predict(?:_many)?\[([0-9a-f-]+)\] succeeded")
TASKS = 200
MANY = 300  # calls held at once by one worker process in the in-flight kill
UPSTREAM_DELAY = 6.0
SUBMITTERS = 16
UPSTREAM_APP = "devstack.upstream:create_app"
MODEL_SLEEP = 0.05  # the session's `counting` model has one worker: 200 x 50 ms = 10 s of work
# Short leases so a dead worker's messages come back in seconds; deadlines stay generous.
FAST_REDELIVERY = {
    "BROKER_VISIBILITY_TIMEOUT": "4",
    "WORKER_HEARTBEAT_INTERVAL": "1",
    "DISPATCH_DEFAULT_TIMEOUT": "120",
    "WORKER_LOG_TASKS": "true",  # the victim's log tells which tasks it held
}


def test_sigkill_worker_mid_flight_loses_nothing(
    dedicated_redis: RedisServer, stack_factory: StackFactory, counting_log: Path
) -> None:
    env = {"REDIS_URL": dedicated_redis.url, **FAST_REDELIVERY}
    stack = stack_factory.start(workers=2, env=env)
    client = dedicated_redis.client()
    run = uuid.uuid4().hex[:10]
    with httpx.Client(base_url=stack.api_url, timeout=10) as http:
        ids = [
            submit(
                http,
                {"model_name": "counting", "input": {"id": f"{run}-{i}", "sleep": MODEL_SLEEP}},
            )
            for i in range(TASKS)
        ]
    final_ids = {task_id: f"{run}-{i}" for i, task_id in enumerate(ids)}

    victim_name = stack.workers[0].name + "@" + socket.gethostname()

    def victim_busy() -> int:
        seen = records(client, ids).values()
        running = [f for f in seen if f["status"] == "running" and f["worker"] == victim_name]
        done = sum(1 for f in seen if f["status"] == "succeeded")
        return len(running) if done >= 20 else 0

    in_flight = wait_until(victim_busy, 30, "worker1 running tasks")
    victim = stack.workers[0]
    victim.kill()  # SIGKILL the whole worker: no warm shutdown, no requeue, no ack
    killed_at = time.time()
    replacement = CeleryWorker(stack.env, "worker3", stack_factory.log_root / "worker-3.log")
    stack.workers.append(replacement)
    replacement.start()

    final = wait_terminal(client, ids, timeout=90)
    all_done_at = time.time()
    statuses = Counter(fields["status"] for fields in final.values())
    # What the victim held when it died: received by it (running or prefetched), not finished.
    log = victim.log_text()
    held = set(RECEIVED.findall(log)) - set(SUCCEEDED.findall(log))
    calls = model_calls(counting_log, run)
    ran_twice = sum(1 for count in calls.values() if count > 1)
    recovery = max(float(final[task_id]["finished_at"]) for task_id in held) - killed_at
    print(
        f"\nWORKER SIGKILL: submitted={TASKS} statuses={dict(statuses)} lost=0 "
        f"held_by_victim={len(held)} (running={in_flight}) ran_twice={ran_twice} "
        f"recovery={recovery:.1f}s (kill -> last held task done; visibility timeout 4 s) "
        f"all_terminal={all_done_at - killed_at:.1f}s after the kill"
    )
    assert statuses == {"succeeded": TASKS}
    assert held, "the kill hit no task"
    # "Held" is read from the victim's log, which lags its work: a task whose result it stored in
    # the instant before the kill, before logging it, is done, by the victim, before the kill.
    done_by_victim = {t for t in held if final[t]["worker"].split("@")[0] == "worker1"}
    assert all(float(final[t]["finished_at"]) <= killed_at for t in done_by_victim)
    redelivered = held - done_by_victim
    assert redelivered, "the kill hit no unfinished task"
    assert {final[t]["worker"].split("@")[0] for t in redelivered} <= {"worker2", "worker3"}
    assert set(calls) == {f"{run}-{i}" for i in range(TASKS)}  # each reached the model
    twice = {task_id for task_id in ids if calls[final_ids[task_id]] > 1}
    assert twice <= held  # only what the victim held ran again, and at most twice
    assert max(calls.values()) <= 2


def test_task_whose_worker_keeps_dying_is_given_up(
    dedicated_redis: RedisServer, stack_factory: StackFactory, counting_log: Path
) -> None:
    """Its worker killed (as the OOM killer would) on every delivery: redelivered to the next
    worker once the lease runs out, then failed with worker_lost once MAX_DELIVERIES is spent: no
    endless loop."""
    env = {"REDIS_URL": dedicated_redis.url, "MAX_DELIVERIES": "2", **FAST_REDELIVERY}
    stack = stack_factory.start(workers=1, env=env)
    client = dedicated_redis.client()
    run = uuid.uuid4().hex[:10]
    with httpx.Client(base_url=stack.api_url, timeout=10) as http:
        task_id = submit(http, {"model_name": "counting", "input": {"id": f"{run}-0", "sleep": 1}})
        kills: list[float] = []
        requeued: list[float] = []
        for delivery in (1, 2, 3):
            wait_until(
                lambda n=delivery: (
                    int(records(client, [task_id])[task_id].get("deliveries", 0)) >= n
                ),
                20,
                f"delivery {delivery}",
            )
            if kills:
                requeued.append(time.monotonic() - kills[-1])
            if delivery == 3:
                break
            wait_until(  # the worker is in the model's call now
                lambda n=delivery: model_calls(counting_log, run)[f"{run}-0"] >= n,
                20,
                f"the model call of delivery {delivery}",
            )
            stack.workers[-1].kill()
            kills.append(time.monotonic())
            name = f"worker{len(stack.workers) + 1}"
            log = stack_factory.log_root / f"{name}.log"
            stack.workers.append(CeleryWorker(stack.env, name, log).start())
        final = wait_terminal(client, [task_id], timeout=20)[task_id]
        view = http.get(f"/tasks/{task_id}").json()
    print(
        f"\nREDELIVERY LOOP: deliveries={final['deliveries']} status={final['status']} "
        f"model_calls={model_calls(counting_log, run)[f'{run}-0']} "
        f"kill->next delivery={', '.join(f'{t:.1f}s' for t in requeued)}"
    )
    assert view["status"] == "failed"
    assert view["error"]["code"] == "worker_lost"
    assert view["error"]["status"] == 503
    assert int(final["deliveries"]) == 3  # two that died, the third gives up without running
    assert "worker was lost 2 times" in view["error"]["msg"]
    wait_until(lambda: model_calls(counting_log, run)[f"{run}-0"] >= 1, 10, "model call logged")
    assert model_calls(counting_log, run)[f"{run}-0"] <= 2
    assert stack.workers[-1].alive  # the worker that gave up is still serving


def test_sigkill_worker_holding_hundreds_of_calls_loses_none(
    dedicated_redis: RedisServer, stack_factory: StackFactory, tmp_path: Path
) -> None:
    """One worker process holds hundreds of calls in flight on its event loop (a stand-in model
    server that holds every call 6 s); SIGKILLed, every one is delivered again and succeeds on
    the replacement, each called exactly twice."""
    delay = {DELAY_ENV: str(UPSTREAM_DELAY)}
    upstream = ApiServer(delay, tmp_path / "upstream.log", app=UPSTREAM_APP).start(30)
    try:
        env = {"REDIS_URL": dedicated_redis.url, "TORCHSERVE_URL": upstream.url,
               **FAST_REDELIVERY, "WORKER_LOG_TASKS": "false",
               "WORKER_MAX_CALLS_PER_BACKEND": str(MANY)}  # fmt: skip
        stack = stack_factory.start(workers=1, env=env)
        client = dedicated_redis.client()
        run = uuid.uuid4().hex[:10]
        with httpx.Client(base_url=stack.api_url, timeout=10) as http:
            with ThreadPoolExecutor(SUBMITTERS) as submitters:  # all in well under the delay
                ids = list(submitters.map(
                    lambda i: submit(http, {"model_name": "long", "input": {"id": f"{run}-{i}"}}),
                    range(MANY),
                ))  # fmt: skip
            wait_until(
                lambda: http.get(f"{upstream.url}/stats").json()["in_flight"] == MANY,
                30,
                f"all {MANY} calls in flight at once",
            )
            stack.workers[0].kill()  # SIGKILL with every one of them in flight
            killed_at = time.monotonic()
            log = stack_factory.log_root / "worker-2.log"
            stack.workers.append(CeleryWorker(stack.env, "worker2", log).start())
            final = wait_terminal(client, ids, timeout=60)
            recovered = time.monotonic() - killed_at
            calls = Counter(http.get(f"{upstream.url}/calls").json())
    finally:
        upstream.stop()
    statuses = Counter(fields["status"] for fields in final.values())
    twice = {key for key, count in calls.items() if count > 1}
    print(
        f"\nWORKER SIGKILL WITH {MANY} CALLS IN FLIGHT: statuses={dict(statuses)} "
        f"ran_twice={len(twice)} all done {recovered:.1f}s after the kill"
    )
    assert statuses == {"succeeded": MANY}
    # Every call was in flight when the worker died: each ran again, once, on the replacement.
    assert dict(calls) == {f"{run}-{i}": 2 for i in range(MANY)}
    assert {final[task_id]["worker"].split("@")[0] for task_id in ids} == {"worker2"}
