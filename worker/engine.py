"""The worker process's engine: one asyncio event loop running every call of every held message.

Why not Celery's pool: a pool thread per call bounds a process to as many calls as threads, and
model servers that batch (vLLM, Triton, TorchServe with batching) want hundreds of concurrent
requests of seconds each. On one loop a call in flight costs a coroutine and a socket, so a
process holds `WORKER_MAX_IN_FLIGHT` of them on a fixed handful of threads.

How a message gets here: Celery's consumer receives it on its own event loop (the hub thread)
and hands it to `submit` (worker/consumer.py, the task's strategy); the engine's thread runs its
tasks (worker/messages.py) and, once every one has ended, calls the message's `done` so the
consumer acks it. The consumer fetches no message while `has_room()` is False: while the process
holds `WORKER_MAX_IN_FLIGHT` tasks, or any of its tasks waits for a slot (its model's is
full), the rest stay in Redis for other workers. At shutdown `drain` lets the running calls
finish and starts no new one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import uvloop

from shared import tracing
from shared.primary_watch import PrimaryWatch
from shared.settings import Settings
from worker import store as stores
from worker.backends import Caller
from worker.http_client import Transport
from worker.messages import TaskEntry, TaskRunner

log = logging.getLogger(__name__)

# A message's tasks have all ended (True), or some never started because the worker is stopping
# or their run failed unexpectedly (False: the message must be delivered again, not acked).
Done = Callable[[bool], None]
SETUP_SECONDS = 10.0


def _nothing() -> None:
    pass


class Engine:
    """One per worker process: the loop's thread, the held tasks' count, the runner on the loop."""

    def __init__(
        self, settings: Settings, worker: str = "", transport: Transport | None = None
    ) -> None:
        self.settings = settings
        self._transport = transport  # the model servers' HTTP: the engine's own pool if None
        self.capacity = settings.worker_max_in_flight
        # Called (from the engine's thread) when the engine has room again after `has_room` said
        # no, so the consumer fetches at once instead of on its next tick.
        self.on_room: Callable[[], None] = _nothing
        self._worker = worker
        self._held = 0  # tasks received, not yet ended
        self._running = 0  # of those, the ones holding their slots
        self._asked = False  # has_room said no since the last change: wake the consumer
        self._lock = threading.Lock()
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="dispatch-engine", daemon=True
        )
        self._messages: set[asyncio.Task[None]] = set()
        self._runner: TaskRunner | None = None
        self._watch: PrimaryWatch | None = None

    # --- from other threads --------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._setup(), self._loop).result(SETUP_SECONDS)

    @property
    def held(self) -> int:
        """Tasks held: running, or waiting for a slot."""
        return self._held

    def has_room(self) -> bool:
        """Whether the consumer may fetch another message: fewer than `capacity` tasks held, and
        every one of them running (none waits for a slot). Waiting tasks are better left in
        Redis, where another worker can take them and an interactive task can pass them."""
        with self._lock:
            room = self._held < self.capacity and self._held == self._running
            self._asked = not room
        return room

    def submit(self, tasks: Sequence[Mapping[str, Any]], done: Done) -> None:
        """Run one message's tasks; `done(ended)` is called from the engine's thread."""
        self._count(held=len(tasks))
        self._loop.call_soon_threadsafe(self._begin, tasks, done)

    def drain(self, timeout: float) -> bool:
        """Start no new task; wait up to `timeout` s for the running ones. True when all ended."""
        future = asyncio.run_coroutine_threadsafe(self._drain(), self._loop)
        try:
            future.result(timeout)
        except FutureTimeout:
            return False
        return True

    def stop(self) -> None:
        """Close the connections and end the loop's thread (after `drain`)."""
        if self._thread.is_alive():
            closing = asyncio.run_coroutine_threadsafe(self._close(), self._loop)
            try:
                closing.result(SETUP_SECONDS)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(SETUP_SECONDS)

    def run_sync(self, tasks: Sequence[Mapping[str, Any]]) -> bool:
        """Run one message's tasks and wait for them: for callers outside a Celery worker."""
        ended = threading.Event()
        outcome: list[bool] = []

        def done(all_ended: bool) -> None:
            outcome.append(all_ended)
            ended.set()

        self.submit(tasks, done)
        ended.wait()
        return outcome[0]

    # --- on the loop ---------------------------------------------------------------------

    @property
    def runner(self) -> TaskRunner:
        assert self._runner is not None, "Engine.start() first"
        return self._runner

    async def _setup(self) -> None:
        client = stores.connect(self.settings)
        tracing.instrument_redis(client)
        store = stores.WorkerStore(self.settings, client, self._worker)
        http = Caller(
            self.settings,
            self._transport,
            # The slots bound the calls (per model and in all); this only bounds connections.
            max_per_origin=self.settings.worker_max_in_flight,
        )
        self._runner = TaskRunner(self.settings, store, http)
        # A request's connection follows a failover when released; this also moves the idle
        # ones as soon as the sentinels name a new primary (shared/primary_watch.py), so that
        # records are not written for seconds to an old primary whose writes will be dropped.
        self._watch = PrimaryWatch([client])
        self._watch.start()

    def _begin(self, tasks: Sequence[Mapping[str, Any]], done: Done) -> None:
        message = self._loop.create_task(self._run_message(tasks, done))
        self._messages.add(message)
        message.add_done_callback(self._messages.discard)

    async def _run_message(self, tasks: Sequence[Mapping[str, Any]], done: Done) -> None:
        try:
            entries = [TaskEntry.parse(task) for task in tasks]
        except Exception:
            # Not one of ours (the API writes every message): nothing could ever run it.
            log.exception("a message whose tasks cannot be read was dropped")
            self._count(held=-len(tasks))
            done(True)
            return
        ran = await asyncio.gather(*(self._run_task(entry) for entry in entries))
        done(all(ran))

    async def _run_task(self, entry: TaskEntry) -> bool:
        slotted = False

        def has_slots() -> None:
            nonlocal slotted
            slotted = True
            self._count(running=1)

        try:
            return await self.runner.run(entry, has_slots)
        except Exception:
            # Its record could not be written (Redis gone for good, after the store's retries):
            # the message goes back to the queue when its lease runs out.
            log.exception("task %s could not be run; its message will be delivered again",
                          entry.task_id)  # fmt: skip
            return False
        finally:
            self._count(held=-1, running=-1 if slotted else 0)

    def _count(self, held: int = 0, running: int = 0) -> None:
        with self._lock:
            self._held += held
            self._running += running
            wake = self._asked and self._held < self.capacity and self._held == self._running
            if wake:
                self._asked = False
        if wake:
            self.on_room()

    async def _drain(self) -> None:
        self.runner.admitting = False
        while self._messages:
            await asyncio.wait(set(self._messages))

    async def _close(self) -> None:
        if self._watch is not None:
            await self._watch.stop()
        if self._runner is not None:
            await self._runner.client.aclose()
            await self._runner.store.redis.aclose()
