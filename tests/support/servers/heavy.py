"""Manners for a long compile on a shared 2-core machine: wait for fault runs, take the heavy lock.

Compiling llama.cpp takes both cores for ~5 minutes. A `make chaos` or `make bench` run measures
timings on a loaded machine and must not be disturbed, so a build first waits (polling every
30 s, at most 45 minutes) while one runs, then holds /tmp/heavy-tests.lock, which every heavy
test run on this machine takes (`flock /tmp/heavy-tests.lock pytest ...`).

That pytest run may itself be the holder: flock(1) locked the file and started pytest, which
then builds. Locking it again from here would wait for ourselves forever, so when the lock is
busy and /proc/locks names one of this process's ancestors as its holder, the build goes ahead
under the lock the run already holds.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

HEAVY_LOCK = Path("/tmp/heavy-tests.lock")
# Fault-test runs on a loaded machine (`pgrep -f` patterns): make chaos, make bench.
BUSY_PATTERNS = ("tests/support/chaos.py", "python -m bench")
POLL_SECONDS = 30.0
MAX_WAIT_SECONDS = 45 * 60.0

Note = Callable[[str], None]


def ancestors(pid: int | None = None) -> set[int]:
    """This process and every parent up to init (from /proc/<pid>/stat)."""
    found: set[int] = set()
    current = pid if pid is not None else os.getpid()
    while current > 0 and current not in found:
        found.add(current)
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
        except OSError:
            break
        current = int(stat.rpartition(")")[2].split()[1])  # field 4: the parent's pid
    return found


def busy_runs() -> list[str]:
    """Command lines of running chaos or bench processes that are not this process's ancestors."""
    mine = ancestors()
    found: list[str] = []
    for pattern in BUSY_PATTERNS:
        result = subprocess.run(
            ["pgrep", "-af", pattern], capture_output=True, text=True, check=False
        )
        for line in result.stdout.splitlines():
            pid, _, command = line.partition(" ")
            if pid.isdigit() and int(pid) not in mine:
                found.append(f"{pid} {command}")
    return found


def wait_for_quiet_machine(note: Note) -> None:
    """Block while a chaos or bench run is going on (at most MAX_WAIT_SECONDS, then go on)."""
    deadline = time.monotonic() + MAX_WAIT_SECONDS
    announced = False
    while busy := busy_runs():
        if time.monotonic() >= deadline:
            note(f"still busy after {MAX_WAIT_SECONDS / 60:.0f} min, building anyway: {busy[0]}")
            return
        if not announced:
            note(f"waiting for a fault/bench run to end before compiling: {busy[0]}")
            announced = True
        time.sleep(POLL_SECONDS)


def lock_holders(path: Path) -> set[int]:
    """PIDs that /proc/locks shows holding a FLOCK on `path` (the processes that took it)."""
    try:
        inode = os.stat(path).st_ino
        table = Path("/proc/locks").read_text()
    except OSError:
        return set()
    holders: set[int] = set()
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 6808 fe:00:2156471 0 EOF"; blocked waiters start with "->".
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            holders.add(int(fields[4]))
    return holders


@contextmanager
def heavy_lock(note: Note, path: Path = HEAVY_LOCK) -> Iterator[None]:
    """Hold the machine's heavy-work lock for the block (or run under an ancestor's hold)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if lock_holders(path) & ancestors():
                note(f"{path} is held by this run's own flock: building under it")
            else:
                note(f"waiting for {path} (another heavy run holds it)")
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def courteous_build(note: Note) -> Iterator[None]:
    """Wait for a quiet machine, then hold the heavy lock: the frame for a long compile."""
    wait_for_quiet_machine(note)
    with heavy_lock(note):
        yield
