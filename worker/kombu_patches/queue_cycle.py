"""The queue cycle that makes a general worker read the priority classes interactive first.

Not a patch either: kombu's Redis transport takes a queue cycle by name (the
`queue_order_strategy` transport option, set in shared/celery_app.py), but the protocol such a
class implements is kombu's private one, used only by its own cycles in kombu.utils.scheduling:
`update(queues)` with the queues the worker consumes, `consume(n)` before each BRPOP for the
order to name them in, `rotate(queue)` after each message popped from `queue`. The order itself
is policy and lives with the priority classes (`shared.priorities.fetch_order`).

Symptom without it. A batch backlog gets the same share of a worker as sync callers: kombu's
default cycle (`round_robin`) moves the list it just popped to the back. Its `priority` cycle
names the queues in one fixed order, which starves the lower classes under a flood of
interactive work; `sorted` orders them by name.

Upstream. Strict-priority consumption was asked for in kombu#518
(https://github.com/celery/kombu/issues/518); kombu's cycles offer strict order or round robin,
none a strict order that still leaves the lower classes a share.

Remove when kombu offers a weighted priority cycle whose order is the one given; until then,
check that kombu still calls `update`/`consume`/`rotate` as above (tests/unit/worker/
test_kombu_patches.py drives this class through kombu's `cycle_by_name`).
"""

from __future__ import annotations

from shared.priorities import fetch_order


class InteractiveFirst:
    """A kombu queue cycle: the order of the keys of each BRPOP (see the module docstring)."""

    def __init__(self, it: list[str] | None = None) -> None:
        self.items: list[str] = it if it is not None else []
        self._popped = 0

    def update(self, it: list[str]) -> None:
        self.items[:] = it

    def consume(self, n: int) -> list[str]:
        return fetch_order(self.items[:n], self._popped)

    def rotate(self, last_used: str) -> str:
        self._popped += 1
        return last_used
