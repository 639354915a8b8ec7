"""The dispatcher's own processes for the local stack: Celery workers and the API server."""

from __future__ import annotations

import os
import re
import shutil
import sys
from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Self

import httpx

from devstack.models import REPO_ROOT
from devstack.processes import ManagedProcess, StopsOnExit, free_port, wait_until
from shared.priorities import ALL_QUEUES, INTERACTIVE_QUEUES

HOST = "127.0.0.1"
# shared.prometheus.MULTIPROC_ENV, named here: starting processes imports no prometheus_client.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# uvicorn's lines, once per serving process (console and JSON logs alike carry the message).
_SERVER_STARTED = re.compile(r"Started server process \[(\d+)\]")
_STARTUP_COMPLETE = re.compile(r"Application startup complete")


class _Service(StopsOnExit):
    """A ManagedProcess run from the repository root with os.environ plus `env`."""

    def __init__(
        self,
        argv: list[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        terminate_group: bool = True,
    ) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.process = ManagedProcess(
            argv,
            log_path,
            cwd=REPO_ROOT,
            env={**os.environ, **self.env},
            terminate_group=terminate_group,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.alive

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def log_text(self) -> str:
        return self.process.log_text()

    def launch(self) -> Self:
        """Start the process without waiting for it (to start several in parallel).

        A service whose process has exited starts a new one (same command, log and port): the
        supervisor of `make run` restarts services this way.
        """
        if self.process.alive:
            raise RuntimeError(f"{self.describe()} is running already (pid {self.pid})")
        if self.process.started:
            self.process.stop()  # reap it and whatever is left of its process group
            self.process = self.process.fresh()
        self.process.start()
        return self

    def wait_ready(self, timeout: float) -> Self:
        """Wait until the service is ready; stop it and raise if it is not within `timeout`."""
        try:
            wait_until(self._ready, timeout, self.describe(), 0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def start(self, timeout: float = 60) -> Self:
        return self.launch().wait_ready(timeout)

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    def _ready(self) -> bool: ...

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM (graceful shutdown), then SIGKILL after `timeout` seconds."""
        self.process.stop(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the service and its peers can tell."""
        self.process.kill()

    def __enter__(self) -> Self:
        return self if self.process.started else self.start()


class CeleryWorker(_Service):
    """`celery -A worker.app worker` consuming every priority class's queue, named `<name>@<host>`.

    `interactive()` builds a worker reserved for the interactive class (shared/priorities.py);
    `webhook_consumer()` the other kind: `worker.webhook_app` on the `webhooks` queue.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        name: str,
        log_path: Path,
        concurrency: int = 8,
        pool: str = "threads",
        *,
        app: str = "worker.app",
        queue: str = ",".join(ALL_QUEUES),
    ) -> None:
        argv = [
            sys.executable, "-m", "celery",
            "-A", app,
            "worker",
            "-Q", queue,
            "-n", f"{name}@%h",
            "--pool", pool,
            "--concurrency", str(concurrency),
            "--loglevel", "INFO",
            # Gossip and mingle cost broker traffic and startup time, and nothing uses them.
            "--without-gossip",
            "--without-mingle",
        ]  # fmt: skip
        if {**os.environ, **env}.get("LOG_FORMAT") == "json":
            # No start-up banner: it is printed, not logged, and the log is one JSON object a line.
            argv.insert(3, "--quiet")
        # SIGTERM to the main process only: it runs the warm shutdown and ends its pool. Prefork
        # children reset SIGTERM to the default, so a group-wide SIGTERM would kill running
        # tasks ("WorkerLostError: ... signal 15").
        super().__init__(argv, env, log_path, terminate_group=False)
        self.name = name

    @classmethod
    def interactive(
        cls, env: Mapping[str, str], name: str, log_path: Path, concurrency: int = 4
    ) -> CeleryWorker:
        """A worker for interactive tasks only: capacity a batch backlog can never occupy."""
        return cls(env, name, log_path, concurrency, "threads", queue=",".join(INTERACTIVE_QUEUES))

    @classmethod
    def webhook_consumer(
        cls, env: Mapping[str, str], log_path: Path, name: str = "webhooks", concurrency: int = 16
    ) -> CeleryWorker:
        """The webhook consumer (worker/webhooks.py): threads, as its sends wait on receivers."""
        return cls(
            env,
            name,
            log_path,
            concurrency,
            "threads",
            app="worker.webhook_app",
            queue="webhooks",
        )

    def start(self, timeout: float = 60) -> Self:
        """Start and wait for Celery's "ready." line: the consumer is connected to the broker."""
        return super().start(timeout)

    def describe(self) -> str:
        return f"Celery worker {self.name}"

    def stop(self, timeout: float = 10) -> None:
        """Warm shutdown: SIGTERM lets running tasks finish, then SIGKILL after `timeout`."""
        super().stop(timeout)

    def _ready(self) -> bool:
        self.process.check_alive(self.describe())
        # This run's output only: a restarted worker appends to the log of the one before it.
        return "ready." in self.process.run_log_text()


class ApiServer(_Service):
    """The FastAPI app under uvicorn on 127.0.0.1, in `workers` processes (`uvicorn --workers`).

    Several processes share one Prometheus multiprocess directory (`metrics_dir`, by default
    `<log name>-metrics` next to the log), set as PROMETHEUS_MULTIPROC_DIR for them only and
    emptied before every start: samples of an earlier run's processes would be counted again.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        port: int | None = None,
        *,
        app: str = "api.main:create_app",
        access_log: bool = False,
        workers: int = 1,
        metrics_dir: Path | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"an API server needs at least one process, not {workers}")
        self.port = port if port is not None else free_port()
        self.workers = workers
        self.metrics_dir: Path | None = None
        if workers > 1:
            self.metrics_dir = metrics_dir or log_path.with_name(f"{log_path.stem}-metrics")
            env = {**env, MULTIPROC_ENV: str(self.metrics_dir)}
        argv = [
            sys.executable, "-m", "uvicorn", app,
            "--factory",
            "--host", HOST,
            "--port", str(self.port),
            # A line per request costs API CPU; the tests that read them turn it on.
            *([] if access_log else ["--no-access-log"]),
            *(["--workers", str(workers)] if workers > 1 else []),
        ]  # fmt: skip
        super().__init__(argv, env, log_path)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def launch(self) -> Self:
        if self.metrics_dir is not None and not self.process.alive:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir.mkdir(parents=True)
        return super().launch()

    def server_pids(self) -> list[int]:
        """The processes serving requests: uvicorn's workers, or the one process without any."""
        if self.workers == 1:
            return [self.pid]
        started = _SERVER_STARTED.findall(self.process.run_log_text())
        return [int(pid) for pid in dict.fromkeys(started)]

    def start(self, timeout: float = 30) -> Self:
        """Start and wait until GET /health answers 200."""
        return super().start(timeout)

    def describe(self) -> str:
        return f"API server on port {self.port}"

    def _ready(self) -> bool:
        self.process.check_alive(self.describe())
        # Every process, not just the first one up: a test or benchmark that starts several
        # wants each of them to take connections.
        if self.workers > 1 and len(self._started_up()) < self.workers:
            return False
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _started_up(self) -> list[str]:
        return _STARTUP_COMPLETE.findall(self.process.run_log_text())
