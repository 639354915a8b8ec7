"""Celery workers plus one API server on a shared environment: the dispatcher as a whole."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from devstack.processes import StopsOnExit
from devstack.services import ApiServer, CeleryWorker


@dataclass
class Stack(StopsOnExit):
    """The dispatcher's processes; `stop()` ends them in reverse start order (API first)."""

    env: dict[str, str]
    api: ApiServer
    workers: list[CeleryWorker] = field(default_factory=list)
    # The webhook consumers (worker/webhooks.py), on their own queue.
    webhook_consumers: list[CeleryWorker] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return self.api.url

    @property
    def log_paths(self) -> list[Path]:
        services = [*self.workers, *self.webhook_consumers, self.api]
        return [service.log_path for service in services]

    def logs(self) -> str:
        """Every process's log, each under a header naming its file (for test failure output)."""
        services = [*self.workers, *self.webhook_consumers, self.api]
        return "\n".join(
            f"===== {service.log_path} =====\n{service.log_text()}" for service in services
        )

    def start(self, timeout: float = 60) -> Self:
        """Launch the workers and the API in parallel, then wait until each is ready.

        If anything fails to start, what did start is stopped before the error propagates.
        """
        try:
            for worker in [*self.workers, *self.webhook_consumers]:
                worker.launch()
            self.api.launch()
            for service in [*self.workers, *self.webhook_consumers, self.api]:
                service.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10) -> None:
        # The API first, so nothing new is enqueued while the workers drain.
        self.api.stop(timeout)
        for worker in reversed([*self.workers, *self.webhook_consumers]):
            worker.stop(timeout)


def start_stack(
    env: Mapping[str, str],
    log_dir: Path,
    *,
    workers: int = 1,
    concurrency: int = 8,
    pool: str = "threads",
    api_port: int | None = None,
    timeout: float = 60,
    worker_app: str = "worker.app",
    api_app: str = "api.main:create_app",
    webhook_consumers: int = 1,
    interactive_workers: int = 0,
) -> Stack:
    """Start `workers` Celery workers (in parallel) and the API; all get os.environ plus `env`.

    Plus `interactive_workers` workers reserved for the interactive class (`log_dir/
    interactive-<i>.log`, `concurrency` threads each) and `webhook_consumers` webhook consumers
    (`log_dir/webhooks-<i>.log`).
    Logs go to `log_dir/worker-<i>.log` and `log_dir/api.log`. If anything fails to start,
    what did start is stopped before the error propagates.
    """
    return Stack(
        env=dict(env),
        api=ApiServer(env, log_dir / "api.log", api_port, app=api_app),
        workers=[
            CeleryWorker(
                env, f"worker{i}", log_dir / f"worker-{i}.log", concurrency, pool, app=worker_app
            )
            for i in range(1, workers + 1)
        ]
        + [
            CeleryWorker.interactive(
                env, f"interactive{i}", log_dir / f"interactive-{i}.log", concurrency
            )
            for i in range(1, interactive_workers + 1)
        ],
        webhook_consumers=[
            CeleryWorker.webhook_consumer(env, log_dir / f"webhooks-{i}.log", f"webhooks{i}")
            for i in range(1, webhook_consumers + 1)
        ],
    ).start(timeout)
