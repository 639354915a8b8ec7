"""Issue 19's fault table: Redis Sentinel faults under ~100 submits/s, no accepted task lost.

Each fault runs on a fresh topology (tests/support/sentinel.py: 1 primary, 2 replicas, 3
sentinels on loopback) with the real API, two Celery workers and the session TorchServe, under
tests/support/failover_load.py's load (sync and async dispatches, a batch every second) from
BEFORE seconds before the fault until AFTER seconds after it. The invariant, for every fault:
each request answered 200/202 reaches `succeeded` with its own result (lost = 0) and every 200
carried the right result. Each run prints one `FAILOVER key=value ...` line and appends it as
JSON to .local/failover/<fault>.jsonl (the table in docs/RELIABILITY.md is built from them).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from devstack import CeleryWorker, Stack, wait_until
from tests.support.failover_load import FailoverLoad, verify
from tests.support.faults import records
from tests.support.sentinel import SentinelTopology
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / ".local" / "failover"
BEFORE = 5.0  # seconds of load before the fault
AFTER = 12.0  # and after the fault's action returned (a failover: once the sentinels agree)
FREEZE = 5.0  # how long the frozen primary stays stopped (the fault itself, not a wait)
RATE = 100.0
# Short leases and heartbeats so a dead worker's messages come back in seconds; a sync wait
# shorter than the default so a waiter that never hears of its task answers 202 within the run.
ENV = {
    "BROKER_VISIBILITY_TIMEOUT": "6",
    "WORKER_HEARTBEAT_INTERVAL": "1",
    "REDIS_REPLICA_WAIT_MS": "500",
    "REDIS_SOCKET_TIMEOUT": "1.5",
    "DISPATCH_DEFAULT_WAIT": "20",
    "DISPATCH_DEFAULT_TIMEOUT": "120",
    # A message kombu lost (worker/reconciler.py) is pushed again within the run's drain bound.
    "RECONCILE_AFTER_SECONDS": "5",
    "RECONCILE_PERIOD_SECONDS": "2",
}


@dataclass
class Run:
    """What a fault hands back: when its first blow struck (epoch), worker names it killed,
    and its own timings for the row."""

    at: float
    killed_workers: set[str] = field(default_factory=set)
    notes: dict[str, float] = field(default_factory=dict)


Fault = Callable[[SentinelTopology, Stack, StackFactory], Run]


def _since(started: float) -> float:
    return round(time.monotonic() - started, 2)


def kill_primary(topology: SentinelTopology, stack: Stack, factory: StackFactory) -> Run:
    old = topology.primary()
    at, started = time.time(), time.monotonic()
    old.kill()
    topology.wait_new_primary(old, 60)
    return Run(at, notes={"switch_s": _since(started)})


def manual_failover(topology: SentinelTopology, stack: Stack, factory: StackFactory) -> Run:
    at, started = time.time(), time.monotonic()
    topology.failover()
    return Run(at, notes={"switch_s": _since(started)})


def freeze_primary(topology: SentinelTopology, stack: Stack, factory: StackFactory) -> Run:
    old = topology.primary()
    at, started = time.time(), time.monotonic()
    old.freeze()
    try:
        time.sleep(FREEZE)  # the fault's length: the sentinels may or may not switch within it
    finally:
        old.thaw()
    new = topology.wait_new_primary(old, 60)
    return Run(at, notes={"switch_s": _since(started), "new_port": float(new.port)})


def kill_replica(topology: SentinelTopology, stack: Stack, factory: StackFactory) -> Run:
    victim = topology.replicas()[0]
    at = time.time()
    victim.kill()
    return Run(at)


def kill_sentinel(topology: SentinelTopology, stack: Stack, factory: StackFactory) -> Run:
    at = time.time()
    topology.sentinels[0].kill()
    return Run(at)


def kill_worker_in_failover(topology: SentinelTopology, stack: Stack, factory: StackFactory) -> Run:
    at, started = time.time(), time.monotonic()
    switch = threading.Thread(target=topology.failover)
    switch.start()
    victim = stack.workers[0]
    victim.kill()  # SIGKILL while the sentinels switch: its messages come back after the lease
    replacement = CeleryWorker(stack.env, "worker3", factory.log_root / "worker-3.log")
    stack.workers.append(replacement)
    replacement.start()
    switch.join(60)
    assert not switch.is_alive(), "the failover did not end"
    return Run(at, killed_workers={victim.name}, notes={"switch_s": _since(started)})


def two_failovers(topology: SentinelTopology, stack: Stack, factory: StackFactory) -> Run:
    at, started = time.time(), time.monotonic()
    topology.failover()
    first = _since(started)
    topology.failover()  # refused (INPROG) until the first one settled: failover() retries
    return Run(at, notes={"switch_s": first, "second_switch_s": _since(started)})


def old_primary_rejoins(topology: SentinelTopology, stack: Stack, factory: StackFactory) -> Run:
    old = topology.primary()
    at, started = time.time(), time.monotonic()
    old.kill()
    topology.wait_new_primary(old, 60)
    switch = _since(started)
    old.start()  # empty (no persistence here), as a master, until the sentinels demote it
    # It follows the new primary, or the next one should that one be failed over in turn.
    topology.wait_replica_of(old, timeout=60)
    return Run(at, notes={"switch_s": switch, "rejoined_s": _since(started)})


FAULTS: dict[str, Fault] = {
    "primary_sigkill": kill_primary,
    "sentinel_failover": manual_failover,
    "primary_sigstop_5s": freeze_primary,
    "replica_sigkill": kill_replica,
    "sentinel_sigkill": kill_sentinel,
    "worker_sigkill_in_failover": kill_worker_in_failover,
    "two_failovers": two_failovers,
    "old_primary_rejoins": old_primary_rejoins,
}


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[SentinelTopology]:
    """Requested before `stack_factory`, so the stack stops before its Redis does."""
    with SentinelTopology(tmp_path / "sentinel") as topology:
        yield topology


@pytest.mark.parametrize("fault", list(FAULTS))
def test_no_accepted_task_is_lost(
    fault: str,
    topology: SentinelTopology,
    stack_factory: StackFactory,
    counting_log: Path,
) -> None:
    stack = stack_factory.start(
        workers=2, concurrency=8, env={**topology.env, **ENV}, webhook_consumers=0
    )
    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        wait_until(lambda: http.get("/ready").status_code == 200, 30, "ready before the fault")
        warm = http.post("/dispatch_model", json={"model_name": "echo", "input": {"warm": 1}})
        assert warm.status_code == 200, warm.text
    run = uuid.uuid4().hex[:10]
    load = FailoverLoad(stack.api_url, run, rate=RATE).start()
    try:
        time.sleep(BEFORE)  # load before the fault: its length, not a wait for a state
        fault_started = time.monotonic()
        outcome = FAULTS[fault](topology, stack, stack_factory)
        fault_seconds = time.monotonic() - fault_started
        time.sleep(AFTER)
    finally:
        answers = load.stop()

    def read(ids: list[str]) -> dict[str, dict[str, str]]:
        with topology.primary().client(decode_responses=False) as client:
            return records(client, ids)

    figures = verify(
        fault, answers, read, outcome.at, counting_log, run, killed_workers=outcome.killed_workers
    )
    figures.notes = {"fault_s": round(fault_seconds, 2), **outcome.notes}
    print("\n" + figures.line())
    for task in figures.twice_ids:
        print(f"FAILOVER {fault} ran twice: {task}")
    figures.append_to(OUT / f"{fault}.jsonl")

    assert figures.lost == 0, f"{figures.lost} accepted tasks lost, e.g. {figures.lost_ids}"
    assert figures.wrong_200 == 0, f"200s with a wrong result: {figures.wrong_ids}"
    assert figures.first_accept_s is not None, "no submit was accepted after the fault"
    if fault == "sentinel_sigkill":  # nothing changes for the clients
        assert figures.refused_503 == 0, figures.line()
