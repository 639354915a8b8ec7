"""Keeps the local stack's processes running: a dead one is restarted with exponential backoff.

`make run` is the embedded single-machine deployment, so a crash of one process (the worker, the
API, redis-server, TorchServe) must not take the others down with it, and must not need a human
to notice. Each supervised process gets a watcher thread: it notices the exit, stops what is left
of the process's group, waits (0.5 s doubling to 30 s, back to 0.5 s once a run lasted a minute)
and starts it again through the server's own `start()`, which waits until it is ready.

Hand-written rather than supervisord or circus: those run separate daemons from config files and
know nothing about readiness (TorchServe's models READY, Celery's "ready." line); the servers here
already know how to start, wait and stop themselves, and the loop around them is small.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL = 0.2


class Supervisable(Protocol):
    """What the servers of devstack (RedisServer, TorchServe, CeleryWorker, ApiServer) offer."""

    @property
    def alive(self) -> bool: ...

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def log_path(self) -> Path: ...

    def start(self) -> object:
        """Start and wait until ready; raise if it is not (having stopped what it started)."""
        ...

    def stop(self, timeout: float = 10) -> None: ...


@dataclass
class Backoff:
    """Restart delays: `initial`, times `factor` per quick death, capped at `maximum`.

    A process that stayed up `reset_after` seconds before dying starts over at `initial`: a
    crash once a day is restarted at once, a crash loop settles at one attempt per `maximum`.
    """

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    reset_after: float = 60.0
    _next: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.factor < 1:
            raise ValueError("Backoff needs 0 < initial <= maximum and factor >= 1")
        self._next = self.initial

    def delay(self, uptime: float) -> float:
        """The wait before restarting a process that died after running `uptime` seconds."""
        if uptime >= self.reset_after:
            self._next = self.initial
        delay = self._next
        self._next = min(self._next * self.factor, self.maximum)
        return delay


def describe_exit(returncode: int | None) -> str:
    """`exit code 3`, `killed by SIGKILL`, or `exit status unknown`."""
    if returncode is None:
        return "exit status unknown"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class _Child:
    """One supervised server, its backoff and its restart count, watched by its own thread."""

    def __init__(
        self,
        name: str,
        server: Supervisable,
        backoff: Backoff,
        stopping: threading.Event,
        clock: Callable[[], float],
        poll_interval: float,
    ) -> None:
        self.name = name
        self.server = server
        self.backoff = backoff
        self.restarts = 0
        self._stopping = stopping
        self._clock = clock
        self._poll_interval = poll_interval
        self._started_at = clock()
        self.thread = threading.Thread(target=self._watch, name=f"supervise {name}", daemon=True)

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    def _watch(self) -> None:
        """Wait for the process to exit, then restart it after the backoff; until stopping."""
        while True:
            while self.server.alive:
                if self._stopping.wait(self._poll_interval):
                    return
            if self._stopping.is_set():
                return
            self._restart()

    def _restart(self) -> None:
        uptime = self._clock() - self._started_at
        pid, returncode = self._last_pid(), self.server.returncode
        # Whatever the process left behind (TorchServe's model workers, a half-started group)
        # goes first: it would hold the ports the new process binds.
        self.server.stop(5)
        delay = self.backoff.delay(uptime)
        self.restarts += 1
        log.warning(
            "%s (pid %s) stopped: %s after %.1f s; restart %d in %g s (its log: %s)",
            self.name, pid, describe_exit(returncode), uptime, self.restarts, delay,
            self.log_path,
        )  # fmt: skip
        if self._stopping.wait(delay):
            return
        self._started_at = self._clock()
        try:
            self.server.start()
        except Exception as exc:  # any failure to start is retried, never fatal
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if not self._stopping.is_set():
                log.warning("%s did not come back: %s", self.name, first_line)
            # Not ready in time but still running (RedisServer leaves it so): stop it, so the
            # loop sees it dead and backs off further instead of taking it for up.
            self.server.stop(5)
            return
        if not self._stopping.is_set():
            log.info(
                "%s is back (pid %d), restart %d, ready after %.1f s",
                self.name, self.server.pid, self.restarts, self._clock() - self._started_at,
            )  # fmt: skip

    def _last_pid(self) -> int | str:
        try:
            return self.server.pid
        except RuntimeError:  # never started
            return "?"


class Supervisor:
    """Starts servers, restarts the ones that die, and stops them all (reverse order) on `stop()`.

    `start(name, server)` runs in the caller's thread and raises if the server does not come up:
    a stack that cannot start is a configuration error, not something to retry forever.
    """

    def __init__(
        self,
        *,
        backoff: Callable[[], Backoff] = Backoff,
        clock: Callable[[], float] = time.monotonic,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        self._backoff = backoff
        self._clock = clock
        self._poll_interval = poll_interval
        self._stopping = threading.Event()
        self._children: list[_Child] = []

    @property
    def children(self) -> list[_Child]:
        return list(self._children)

    def restarts(self) -> dict[str, int]:
        """How often each supervised process was restarted, in start order."""
        return {child.name: child.restarts for child in self._children}

    def start(self, name: str, server: Supervisable) -> None:
        """Start `server` (stopped by `stop()` even if starting fails), then keep it running."""
        if self._stopping.is_set():
            raise RuntimeError("the supervisor is stopping")
        child = _Child(
            name, server, self._backoff(), self._stopping, self._clock, self._poll_interval
        )
        self._children.append(child)
        server.start()
        child.thread.start()

    def stop(self, timeout: float = 10) -> None:
        """Stop restarting, then stop every process, the last started first."""
        self._stopping.set()
        for child in reversed(self._children):
            child.server.stop(timeout)
            # A watcher may be inside `start()` of a process spawned after the stop above: stop
            # that one too, which makes `start()` fail and the watcher return.
            while child.thread.is_alive():
                child.thread.join(0.5)
                child.server.stop(timeout)
            child.server.stop(timeout)

    def summary(self) -> str:
        """`restarts: redis-server 0, Celery worker 2` (for the exit message)."""
        counts = ", ".join(f"{name} {count}" for name, count in self.restarts().items())
        return f"restarts: {counts or 'none supervised'}"
