"""The order a general worker reads the priority classes' queues in (`fetch_order`); the queue
cycle that hands it to kombu is tested in tests/unit/worker/test_kombu_patches.py."""

from __future__ import annotations

import pytest

from shared.priorities import ALL_QUEUES, LOWER_FIRST_EVERY, Priority, fetch_order, queue_of

INTERACTIVE, DEFAULT, BATCH = ALL_QUEUES


def test_the_classes_in_order_and_other_queues_after_them_as_given() -> None:
    assert fetch_order([BATCH, "other", DEFAULT, "another", INTERACTIVE], 0) == [
        INTERACTIVE,
        DEFAULT,
        BATCH,
        "other",
        "another",
    ]
    assert [queue_of(priority) for priority in Priority] == list(ALL_QUEUES)


@pytest.mark.parametrize("fetches", range(3 * LOWER_FIRST_EVERY))
def test_one_fetch_in_lower_first_every_names_the_lower_classes_first(fetches: int) -> None:
    order = fetch_order([DEFAULT, BATCH, INTERACTIVE], fetches)
    if fetches % LOWER_FIRST_EVERY == LOWER_FIRST_EVERY - 1:
        assert order == [BATCH, DEFAULT, INTERACTIVE]
    else:
        assert order == [INTERACTIVE, DEFAULT, BATCH]
