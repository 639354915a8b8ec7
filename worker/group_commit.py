"""Group commit across one worker process's threads: STARTs and outcomes share Redis calls.

Like submits in the API (api/group_commit.py): the first thread writes at once; threads that
arrive while that write is in flight go together in the next one (one task_start or task_finish
call), written by one of them. Nothing is shared per item but the round trip.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar, cast

T = TypeVar("T")
R = TypeVar("R")


class _Slot(Generic[T, R]):
    """One item waiting in a GroupCommit: written, failed, or handed the lead."""

    def __init__(self, item: T) -> None:
        self.item = item
        self.woken = threading.Event()
        self.done = False
        self.value: R | None = None
        self.error: BaseException | None = None

    def settle(self, value: R | None = None, error: BaseException | None = None) -> None:
        self.value, self.error, self.done = value, error, True
        self.woken.set()

    def result(self) -> R:
        if self.error is not None:
            raise self.error
        return cast(R, self.value)


class GroupCommit(Generic[T, R]):
    """Group commit across this process's threads: `call(item)` writes the item with every other
    item pending at that moment in one `write(items) -> results` call. The first caller writes at
    once; callers that arrive meanwhile go together in the next call, led by one of them."""

    def __init__(self, write: Callable[[list[T]], Sequence[R]]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._pending: list[_Slot[T, R]] = []
        self._writing = False

    def call(self, item: T) -> R:
        slot: _Slot[T, R] = _Slot(item)
        with self._lock:
            self._pending.append(slot)
            lead, self._writing = not self._writing, True
        if not lead:
            slot.woken.wait()
            if slot.done:
                return slot.result()
        self._write_round()  # led by this thread: the round includes its own item
        return slot.result()

    def _write_round(self) -> None:
        with self._lock:
            group, self._pending = self._pending, []
        try:
            results = self._write([slot.item for slot in group])
        except BaseException as error:
            for slot in group:
                slot.settle(error=error)
        else:
            for slot, value in zip(group, results, strict=True):
                slot.settle(value)
        finally:
            with self._lock:
                if self._pending:  # arrived meanwhile: the first of them leads the next round
                    self._pending[0].woken.set()
                else:
                    self._writing = False
