"""Facts about this machine and its processes, read from /proc (Linux only, like the stack)."""

from __future__ import annotations

import os
import platform
import resource
from dataclasses import dataclass
from pathlib import Path

from devstack import proc_stats

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Machine:
    """What the numbers were measured on (written next to the table)."""

    cores: int
    memory_gib: float
    cpu_model: str
    kernel: str

    def describe(self) -> str:
        return (
            f"{self.cores} cores ({self.cpu_model}), {self.memory_gib:.1f} GiB memory, "
            f"Linux {self.kernel}"
        )


def _meminfo_kib(field: str) -> int:
    for line in (PROC / "meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0])
    raise KeyError(field)


def _cpu_model() -> str:
    for line in (PROC / "cpuinfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name":
            return value.strip()
    return platform.processor() or "unknown CPU"


def machine() -> Machine:
    return Machine(
        cores=os.cpu_count() or 1,
        memory_gib=_meminfo_kib("MemTotal") / 1024 / 1024,
        cpu_model=_cpu_model(),
        kernel=platform.release(),
    )


def raise_open_files_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; children (the stack, clients) inherit it.

    5,000 waiting clients need 5,000 sockets in the client processes and as many in the API.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65_536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def status_field(pid: int, field: str) -> int:
    """An integer field of /proc/<pid>/status: `Threads`, or `VmRSS` (kB)."""
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def threads(pid: int) -> int:
    return status_field(pid, "Threads")


def rss_mb(pid: int) -> float:
    """Resident memory in MB (10^6 bytes; /proc reports KiB)."""
    return status_field(pid, "VmRSS") * 1024 / 1e6


def group_cpu_seconds(pgid: int) -> dict[int, float]:
    """User + system CPU seconds of every live process in a process group, by pid.

    Each devstack service leads its own session, so its group holds everything it spawned
    (TorchServe's Java frontend and its Python model workers too). By pid, because processes
    come and go (TorchServe scaling its workers): a difference is only taken per process.
    """
    return {
        pid: (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        for pid, fields in proc_stats()
        if len(fields) > 12 and int(fields[2]) == pgid
    }


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two `group_cpu_seconds` snapshots by the processes still alive.

    A process that ended in between is left out (its last seconds are lost, never negative).
    """
    return sum(now - before.get(pid, 0.0) for pid, now in after.items())


def children_cpu_seconds() -> float:
    """CPU seconds of this process's reaped children (wrk runs), for the load generator's share."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
