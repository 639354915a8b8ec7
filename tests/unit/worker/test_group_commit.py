"""The worker's group commit and priority pool (worker/messages.py), with threads and no servers."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from worker.group_commit import GroupCommit
from worker.pool import PriorityPool

WAIT = 10.0


class GatedWrites:
    """A write function whose first call blocks until released; records every call's items."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.first_started = threading.Event()
        self.release = threading.Event()
        self.fail_next = False

    def __call__(self, items: list[int]) -> Sequence[str]:
        self.calls.append(list(items))
        if len(self.calls) == 1:
            self.first_started.set()
            assert self.release.wait(WAIT)
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("redis went away")
        return [f"done {item}" for item in items]


def call_in_thread(
    group: GroupCommit[int, str], item: int, results: dict[int, object]
) -> threading.Thread:
    def run() -> None:
        try:
            results[item] = group.call(item)
        except Exception as error:  # what the caller would see
            results[item] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_lone_item_is_written_at_once_alone() -> None:
    writes = GatedWrites()
    writes.release.set()
    group: GroupCommit[int, str] = GroupCommit(writes)
    assert group.call(1) == "done 1"
    assert group.call(2) == "done 2"
    assert writes.calls == [[1], [2]]


def test_items_arriving_during_a_write_share_the_next_one() -> None:
    writes = GatedWrites()
    group: GroupCommit[int, str] = GroupCommit(writes)
    results: dict[int, object] = {}
    first = call_in_thread(group, 0, results)
    assert writes.first_started.wait(WAIT)
    others = [call_in_thread(group, n, results) for n in range(1, 6)]
    # All five are queued behind the write in flight before it ends.
    while len(group._pending) < 5:
        threading.Event().wait(0.001)
    writes.release.set()
    for thread in [first, *others]:
        thread.join(WAIT)
    assert writes.calls == [[0], [1, 2, 3, 4, 5]]
    assert results == {n: f"done {n}" for n in range(6)}


def test_a_failed_write_fails_its_group_only() -> None:
    writes = GatedWrites()
    group: GroupCommit[int, str] = GroupCommit(writes)
    results: dict[int, object] = {}
    writes.fail_next = True
    first = call_in_thread(group, 0, results)
    assert writes.first_started.wait(WAIT)
    second = call_in_thread(group, 1, results)
    while len(group._pending) < 1:
        threading.Event().wait(0.001)
    writes.release.set()
    first.join(WAIT)
    second.join(WAIT)
    assert isinstance(results[0], ConnectionError)
    assert results[1] == "done 1"  # the next group, written after the failure
    assert group.call(2) == "done 2"  # and the committer is idle again, not stuck


def test_the_pool_runs_the_lowest_rank_first() -> None:
    pool = PriorityPool(1)
    gate, order = threading.Event(), []
    blocker = pool.submit(0, lambda: gate.wait(WAIT))
    later = [pool.submit(rank, lambda rank=rank: order.append(rank)) for rank in (2, 1, 2, 0)]
    gate.set()
    for future in [blocker, *later]:
        future.result(WAIT)
    assert order == [0, 1, 2, 2]


def test_an_exception_in_the_pool_reaches_the_caller() -> None:
    pool = PriorityPool(2)

    def boom() -> None:
        raise ValueError("model crashed")

    with pytest.raises(ValueError, match="model crashed"):
        pool.submit(0, boom).result(WAIT)
    assert pool.submit(0, lambda: 42).result(WAIT) == 42  # the thread survived
