"""Priority classes: `interactive`, `default`, `batch`, each its own Celery queue.

Celery's priorities on Redis are emulated (one list per priority step, "approximate at best"), so
each class is a separate list instead, and workers decide the order they read them in:

- A general worker (`-Q` ALL_QUEUES) BRPOPs the three lists in one call. Kombu's Redis transport
  asks its queue cycle which order to name them in, and BRPOP pops from the first non-empty one.
  Kombu's default cycle (`round_robin`) moves the list it just popped to the back, which gives a
  batch backlog the same share as sync callers; `fetch_order` below names interactive first,
  then default, then batch, except that every LOWER_FIRST_EVERY-th fetch names them the other way
  round, so a flood of interactive work still leaves batch items a share (no starvation either way).
  The queue cycle that hands this order to kombu is worker/kombu_patches/queue_cycle.py.
- Prefetch does not hoard: workers only fetch a message when a pool slot is free
  (`worker_disable_prefetch`), so a message never waits in a worker behind batch messages that
  worker took earlier: it stays in its list, where the next free slot finds it first.
- A reserved worker (`-Q dispatch.interactive`) consumes interactive work only: concurrency that
  batch work can never occupy, however slow its model. `make run`, docker compose and the k8s
  base start one next to the general workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum


class Priority(str, Enum):
    """Which queue a task waits in; defaults: sync dispatch interactive, async default, batch."""

    interactive = "interactive"
    default = "default"
    batch = "batch"


# `default` keeps the queue's old name, so messages queued before an upgrade are still consumed.
QUEUES: dict[Priority, str] = {
    Priority.interactive: "dispatch.interactive",
    Priority.default: "dispatch",
    Priority.batch: "dispatch.batch",
}
# In the order a general worker prefers them.
ALL_QUEUES: tuple[str, ...] = tuple(QUEUES.values())
INTERACTIVE_QUEUES: tuple[str, ...] = (QUEUES[Priority.interactive],)
# Every this many fetches, a general worker names the lower classes first (see the docstring).
LOWER_FIRST_EVERY = 4
_RANK = {queue: rank for rank, queue in enumerate(ALL_QUEUES)}


def queue_of(priority: Priority) -> str:
    return QUEUES[priority]


def fetch_order(queues: Sequence[str], fetches: int) -> list[str]:
    """The order a general worker names `queues` in for its next BRPOP, after `fetches` messages
    popped: the classes' order, reversed every LOWER_FIRST_EVERY-th fetch. Unknown queues (another
    app's) come after the classes, in the order they were given."""
    ordered = sorted(queues, key=lambda queue: _RANK.get(queue, len(_RANK)))
    if fetches % LOWER_FIRST_EVERY == LOWER_FIRST_EVERY - 1:
        ordered.reverse()
    return ordered
