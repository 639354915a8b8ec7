"""Slots (worker/slots.py): a bound on calls in flight, lowest rank served first."""

from __future__ import annotations

import asyncio

from worker.slots import Slots


def test_at_most_capacity_hold_a_slot_and_waiters_go_by_rank_then_arrival() -> None:
    async def play() -> tuple[list[str], int]:
        slots = Slots(2)
        order: list[str] = []
        gate = asyncio.Event()

        async def hold(name: str, rank: int) -> None:
            async with slots.hold(rank):
                order.append(name)
                await gate.wait()

        holders = [asyncio.create_task(hold(name, 1)) for name in ("a", "b")]
        await asyncio.sleep(0)
        assert slots.in_use == 2
        waiters = [
            asyncio.create_task(hold(name, rank))
            for name, rank in (("batch", 2), ("late-default", 1), ("interactive", 0))
        ]
        await asyncio.sleep(0)
        assert slots.waiting == 3
        assert order == ["a", "b"]
        gate.set()
        await asyncio.gather(*holders, *waiters)
        return order, slots.in_use

    order, in_use = asyncio.run(play())
    assert order == ["a", "b", "interactive", "late-default", "batch"]
    assert in_use == 0


def test_a_waiter_canceled_as_it_is_handed_a_slot_passes_it_on() -> None:
    async def play() -> tuple[bool, int]:
        slots = Slots(1)
        await slots.acquire(0)
        canceled = asyncio.create_task(slots.acquire(0))
        next_one = asyncio.create_task(slots.acquire(0))
        await asyncio.sleep(0)
        slots.release()  # handed to `canceled`, which is canceled before it runs
        canceled.cancel()
        await asyncio.gather(canceled, return_exceptions=True)
        await asyncio.wait_for(next_one, 1)
        holds = slots.in_use
        slots.release()
        return next_one.done(), holds

    got, holds = asyncio.run(play())
    assert got
    assert holds == 1
