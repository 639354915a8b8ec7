"""The worker's group commit (worker/group_commit.py) on one event loop, with no servers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from worker.group_commit import GroupCommit

WAIT = 10.0


class GatedWrites:
    """A write whose first call waits until released; records every call's items."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.first_started = asyncio.Event()
        self.release = asyncio.Event()
        self.fail_next = False

    async def __call__(self, items: list[int]) -> Sequence[str]:
        self.calls.append(list(items))
        if len(self.calls) == 1:
            self.first_started.set()
            await asyncio.wait_for(self.release.wait(), WAIT)
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("redis went away")
        return [f"done {item}" for item in items]


async def settled(calls: list[asyncio.Task[str]]) -> list[object]:
    return list(await asyncio.gather(*calls, return_exceptions=True))


def test_a_lone_item_is_written_alone() -> None:
    async def play() -> list[list[int]]:
        writes = GatedWrites()
        writes.release.set()
        group: GroupCommit[int, str] = GroupCommit(writes)
        assert await group.call(1) == "done 1"
        assert await group.call(2) == "done 2"
        return writes.calls

    assert asyncio.run(play()) == [[1], [2]]


def test_items_of_one_loop_turn_share_a_write_and_later_ones_the_next() -> None:
    async def play() -> tuple[list[list[int]], list[object]]:
        writes = GatedWrites()
        group: GroupCommit[int, str] = GroupCommit(writes)
        first = [asyncio.create_task(group.call(n)) for n in (0, 1)]
        await asyncio.wait_for(writes.first_started.wait(), WAIT)
        # Arrived while the first write is in flight: all five go together in the second.
        later = [asyncio.create_task(group.call(n)) for n in range(2, 7)]
        await asyncio.sleep(0)
        writes.release.set()
        return writes.calls, await settled([*first, *later])

    calls, results = asyncio.run(play())
    assert calls == [[0, 1], [2, 3, 4, 5, 6]]
    assert results == [f"done {n}" for n in range(7)]


def test_a_group_is_at_most_max_group_items() -> None:
    async def play() -> list[list[int]]:
        writes = GatedWrites()
        writes.release.set()
        group: GroupCommit[int, str] = GroupCommit(writes, max_group=3)
        await settled([asyncio.create_task(group.call(n)) for n in range(7)])
        return writes.calls

    assert asyncio.run(play()) == [[0, 1, 2], [3, 4, 5], [6]]


def test_a_failed_write_fails_its_group_only() -> None:
    async def play() -> tuple[list[object], str]:
        writes = GatedWrites()
        writes.fail_next = True
        group: GroupCommit[int, str] = GroupCommit(writes)
        first = asyncio.create_task(group.call(0))
        await asyncio.wait_for(writes.first_started.wait(), WAIT)
        second = asyncio.create_task(group.call(1))
        await asyncio.sleep(0)
        writes.release.set()
        results = await settled([first, second])
        return results, await group.call(2)  # the committer is idle again, not stuck

    (failed, second), third = asyncio.run(play())
    assert isinstance(failed, ConnectionError)
    assert second == "done 1"  # the next group, written after the failure
    assert third == "done 2"


def test_a_canceled_caller_does_not_cancel_the_write_of_the_others() -> None:
    async def play() -> tuple[list[list[int]], object]:
        writes = GatedWrites()
        group: GroupCommit[int, str] = GroupCommit(writes)
        gone = asyncio.create_task(group.call(0))
        stays = asyncio.create_task(group.call(1))
        await asyncio.wait_for(writes.first_started.wait(), WAIT)
        gone.cancel()
        writes.release.set()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return writes.calls, await stays

    calls, result = asyncio.run(play())
    assert calls == [[0, 1]]
    assert result == "done 1"
