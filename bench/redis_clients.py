"""Whose connections a redis-server holds: CLIENT LIST, each client attributed to its process.

Redis sees a client as an address; the kernel knows which process owns that socket. So a
client of CLIENT LIST belongs to a service when its address's port is the local port of one of
the TCP sockets the service's processes (its process group) hold open to the server's port
(/proc/<pid>/fd, /proc/net/tcp). Sampled in a thread while load runs, so the figure is the most
connections each service held at once, not what is left afterwards.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import redis

from devstack import proc_stats

PROC = Path("/proc")
ESTABLISHED = "01"
SAMPLE_SECONDS = 0.25


def _socket_inodes(pgid: int) -> set[str]:
    """Socket inodes held open by the live processes of a process group."""
    inodes: set[str] = set()
    for pid, fields in proc_stats():
        if len(fields) <= 2 or int(fields[2]) != pgid:
            continue
        try:
            names = os.listdir(PROC / str(pid) / "fd")
        except OSError:  # ended meanwhile
            continue
        for name in names:
            try:
                target = os.readlink(PROC / str(pid) / "fd" / name)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _local_ports_to(port: int) -> dict[str, int]:
    """Socket inode -> local port of every established IPv4/IPv6 TCP connection to `port`."""
    ports: dict[str, int] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cells = line.split()
            local, remote, state, inode = cells[1], cells[2], cells[3], cells[9]
            if state == ESTABLISHED and int(remote.rpartition(":")[2], 16) == port:
                ports[inode] = int(local.rpartition(":")[2], 16)
    return ports


def client_ports(client: redis.Redis) -> list[int]:
    """The client-side port of every connection in CLIENT LIST (Redis's own view)."""
    return [int(str(entry["addr"]).rpartition(":")[2]) for entry in client.client_list()]


def count_by_service(client: redis.Redis, port: int, groups: dict[str, int]) -> dict[str, int]:
    """CLIENT LIST's connections per service (process group ids by name), plus `all`."""
    listed = client_ports(client)
    by_inode = _local_ports_to(port)
    counts = {"all": len(listed)}
    for name, pgid in groups.items():
        owned = {by_inode[inode] for inode in _socket_inodes(pgid) if inode in by_inode}
        counts[name] = sum(1 for local in listed if local in owned)
    return counts


@dataclass
class ConnectionSampler:
    """Samples `count_by_service` in a thread until stopped; `peak` is each one's most."""

    client: redis.Redis
    port: int
    groups: dict[str, int]
    samples: list[dict[str, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _loop(self) -> None:
        while True:
            self.samples.append(count_by_service(self.client, self.port, self.groups))
            if self._stop.wait(SAMPLE_SECONDS):
                return

    @property
    def peak(self) -> dict[str, int]:
        names = ["all", *self.groups]
        return {name: max(sample[name] for sample in self.samples) for name in names}

    def __enter__(self) -> ConnectionSampler:
        self._thread = threading.Thread(target=self._loop, name="redis-clients", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
