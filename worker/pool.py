"""The threads of one worker process for a message's extra tasks, interactive tasks first.

A message's first task runs in the Celery pool's own thread; the others run here, as many threads
as the worker's concurrency, lowest priority rank first: a batch message's items never queue
ahead of a sync caller's task inside the worker (shared/priorities.py).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class PriorityPool:
    """Daemon threads running callables, lowest rank first (FIFO within a rank)."""

    def __init__(self, threads: int) -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Callable[[], Any], Future[Any]]] = (
            queue.PriorityQueue()
        )
        self._order = itertools.count()
        for n in range(max(1, threads)):
            threading.Thread(target=self._work, name=f"dispatch-pool-{n}", daemon=True).start()

    def submit(self, rank: int, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((rank, next(self._order), fn, future))
        return future

    def _work(self) -> None:
        while True:
            _, _, fn, future = self._queue.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as error:  # handed to the waiting Celery thread
                    future.set_exception(error)
