"""Child processes of the local stack: started in their own session, stopped by process group."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, Self, TypeVar

T = TypeVar("T")

_PROC = Path("/proc")


# Every port free_port() returned in this process: see there.
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def _ephemeral_ports() -> range:
    """The range the kernel takes the local ports of outgoing connections (and bind(0)) from."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, never the same one twice.

    Chosen at random *below* the kernel's ephemeral range: a port from bind(0) can be handed to
    any outgoing connection (an HTTP client's, Redis's) in the second between the pick and the
    server binding it, and TorchServe then fails with "Address already in use" (seen in CI).
    Ports below that range are only ever taken by servers that ask for them. Ports handed out
    before in this process are skipped, so one server's five ports are five different ones.
    """
    ephemeral = _ephemeral_ports()
    candidates = range(10000, ephemeral.start) if ephemeral.start > 12000 else ephemeral
    with _handed_out_lock:
        for _ in range(1000):
            port = random.choice(candidates)  # noqa: S311 (not for security)
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1 after 1000 tries")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy, and return that.

    Raises TimeoutError naming `what` after `timeout` seconds. Exceptions from `predicate`
    propagate: a predicate that can fail transiently catches its own errors.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:g} s")
        time.sleep(interval)


def proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, fields of /proc/<pid>/stat after the command name) of every process right now.

    Field 0 is the state (Z: zombie), 2 the process group id, 11 and 12 user and system CPU
    time in clock ticks.
    """
    for stat in _PROC.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        # After the command name, which may itself contain spaces and parentheses.
        yield int(stat.parent.name), text.rpartition(")")[2].split()


def _group_has_live_members(pgid: int) -> bool:
    """Whether any non-zombie process is left in the process group.

    `killpg(pgid, 0)` succeeds on zombies too, and an init that does not reap orphans (seen on
    this machine kind) would make a stopped group look alive forever; /proc tells them apart.
    """
    if not _PROC.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    return any(
        len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z"
        for _, fields in proc_stats()
    )


class StopsOnExit(ABC):
    """A context manager whose `with` block ends in `stop()`.

    `__enter__` returns the object as it is; classes that start on entry override it.
    """

    @abstractmethod
    def stop(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ManagedProcess(StopsOnExit):
    """One child process with its output in a log file; a context manager that stops it.

    The child leads a new session, so its process group holds it and everything it spawns
    (TorchServe's Java frontend and model workers): stopping signals the whole group, and a
    Ctrl-C in the terminal reaches the parent only, which then stops the children in order.
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        terminate_group: bool = True,
    ) -> None:
        """`terminate_group=False`: `stop()` sends SIGTERM to the leader only, for a parent that
        shuts its children down itself (SIGKILL after the timeout still goes to the group)."""
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.terminate_group = terminate_group
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0  # where this run's output begins in the (appended) log
        # Set once the whole group is gone: later stop()/kill() calls must not signal a
        # process group id the OS may have handed out again.
        self._finished = False

    def fresh(self) -> ManagedProcess:
        """An unstarted copy (same command, log, directory and environment), to run it again."""
        return ManagedProcess(
            self.argv,
            self.log_path,
            cwd=self.cwd,
            env=self.env,
            terminate_group=self.terminate_group,
        )

    def start(self) -> Self:
        if self._popen is not None:
            raise RuntimeError(f"{self.argv[0]} was started already (pid {self._popen.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Append: a restarted server (same log path) keeps the history of the previous run.
        self._log = self.log_path.open("ab")
        self._log_start = self._log.tell()
        self._popen = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"{self.argv[0]} has not been started")
        return self._popen

    @property
    def started(self) -> bool:
        return self._popen is not None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the process group (or leader), then SIGKILL what is left after `timeout` s."""
        if self._popen is None or self._finished:
            return
        if self.terminate_group:
            self._signal_group(signal.SIGTERM)
        elif self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._group_alive():
            time.sleep(0.05)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the process group at once (a crash, as far as the child can tell)."""
        if self._popen is None or self._finished:
            return
        self._signal_group(signal.SIGKILL)
        self._popen.wait()
        self._finished = True
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def run_log_text(self) -> str:
        """The log of this run only: what it wrote after `start()` (for readiness checks)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_start)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def check_alive(self, what: str) -> None:
        """Raise with the end of the log if the process has exited (for readiness polling)."""
        if not self.alive:
            raise RuntimeError(
                f"{what} exited with code {self.returncode}; see {self.log_path}:\n"
                f"{self.log_tail()}"
            )

    def _group_alive(self) -> bool:
        return self.popen.poll() is None or _group_has_live_members(self.pid)

    def _signal_group(self, sig: signal.Signals) -> None:
        # The child leads its session, so its pid is the process group id, and the group
        # outlives the leader while any member runs.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def __enter__(self) -> Self:
        return self if self.started else self.start()


class ProcessServer(StopsOnExit):
    """A server run as one ManagedProcess at a time (`start()` makes a new one); `with` starts
    it unless it is running already, and stops it at the end."""

    program: ClassVar[str]  # the server's name in messages

    def __init__(self) -> None:
        self._process: ManagedProcess | None = None

    @abstractmethod
    def start(self) -> Self: ...

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.alive

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError(f"{self.program} has not been started")
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status of the current process (None: running or never started)."""
        return self._process.returncode if self._process is not None else None

    def log_text(self) -> str:
        return self._process.log_text() if self._process is not None else ""

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the server's process group, then SIGKILL what is left after `timeout` s."""
        if self._process is not None:
            self._process.stop(timeout)

    def kill(self) -> None:
        """SIGKILL the server's process group at once (a crash, as far as it can tell)."""
        if self._process is not None:
            self._process.kill()

    def __enter__(self) -> Self:
        return self if self.alive else self.start()
