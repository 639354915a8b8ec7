"""What the end-to-end fixtures build: stacks of dispatcher processes and dedicated TorchServes.

The fixtures themselves are in tests/conftest.py; tests import these classes for type hints and
`require_tool` to skip (locally) or fail (under CI) when an outside tool is missing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import RedisServer, Stack, TorchServe, start_stack

TEST_MODELS_DIR = Path(__file__).parent / "models"
TEST_MODELS = (
    "slow", "failing", "rejecting", "counting", "digest", "mirror", "headers", "streaming",
)  # fmt: skip
LOADED_AT_START = (
    "echo.mar",
    "linear.mar",
    "slow.mar",
    "failing.mar",
    "rejecting.mar",
    "counting.mar",
    "versioned.mar",
    "digest.mar",
    "mirror.mar",
    "headers.mar",
    "streaming.mar",
    "image_info.mar",
    "grayscale.mar",
)
SLOW_WORKERS = 2
# A stream a dispatcher worker let go of (killed, canceled) still runs to its end in its model
# worker: a second one lets the next test's stream start at once.
STREAMING_WORKERS = 2


def ensure_redis(redis_server: RedisServer) -> None:
    # A fault test that killed Redis and failed before restarting it must not take every
    # later test down with it.
    if not redis_server.alive:
        redis_server.start()


class StackFactory:
    """Starts dispatcher stacks (Celery workers + API) on `redis_server` and the session TorchServe.

    `redis_server` is started (again) on first use unless `env` brings its own REDIS_URL.
    """

    def __init__(self, redis_server: RedisServer, torchserve: TorchServe, log_root: Path) -> None:
        self.redis_server = redis_server
        self.torchserve = torchserve
        self.log_root = log_root
        self.stacks: list[Stack] = []

    def base_env(self) -> dict[str, str]:
        return {
            "REDIS_URL": self.redis_server.url,
            "TORCHSERVE_URL": self.torchserve.inference_url,
            # No metrics server per test worker (it would bind 0.0.0.0:9808); tests that scrape
            # one pass a free port and 127.0.0.1.
            "WORKER_METRICS_PORT": "0",
        }

    def start(
        self,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
        concurrency: int = 8,
        pool: str = "threads",
        webhook_consumers: int = 1,
        interactive_workers: int = 0,
    ) -> Stack:
        """Start `workers` workers, `interactive_workers` workers reserved for the interactive
        class, `webhook_consumers` webhook consumers and the API with REDIS_URL, TORCHSERVE_URL
        plus `env`."""
        if "REDIS_URL" not in (env or {}):
            ensure_redis(self.redis_server)
        log_dir = self.log_root / f"stack-{len(self.stacks) + 1}"
        stack = start_stack(
            {**self.base_env(), **(env or {})},
            log_dir,
            workers=workers,
            concurrency=concurrency,
            pool=pool,
            webhook_consumers=webhook_consumers,
            interactive_workers=interactive_workers,
        )
        self.stacks.append(stack)
        return stack

    def stop_all(self) -> None:
        for stack in reversed(self.stacks):
            stack.stop()

    @contextmanager
    def running(self, **start: Any) -> Iterator[Stack]:
        """The stack `start(**start)` starts; on exit every stack of this factory is stopped."""
        try:
            yield self.start(**start)
        finally:
            self.stop_all()

    @contextmanager
    def client(self, timeout: float = 30, **start: Any) -> Iterator[httpx.Client]:
        """An httpx client on the API of the stack `running(**start)` runs."""
        with (
            self.running(**start) as stack,
            httpx.Client(base_url=stack.api_url, timeout=timeout) as client,
        ):
            yield client

    def logs(self) -> str:
        return "\n".join(stack.logs() for stack in self.stacks)


class TorchServeFactory:
    """Dedicated TorchServe instances for tests that stop, restart or overload one."""

    def __init__(self, model_store: Path, root: Path) -> None:
        self.model_store = model_store
        self.root = root
        self.servers: list[TorchServe] = []

    def start(
        self,
        models: tuple[str, ...] = ("counting.mar",),
        *,
        workers: int = 1,
        job_queue_size: int = 100,
        counting_log: Path | None = None,
    ) -> TorchServe:
        """A started TorchServe on free ports serving `models` from the session's model store."""
        workdir = self.root / f"torchserve-{len(self.servers) + 1}"
        log = counting_log or workdir / "counting.jsonl"
        server = TorchServe(
            workdir,
            self.model_store,
            models,
            workers_per_model=workers,
            job_queue_size=job_queue_size,
            env={"COUNTING_MODEL_LOG": str(log)},
        )
        self.servers.append(server)
        return server.start()

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            server.stop()


def require_tool(available: bool, reason: str) -> None:
    """Skip a test whose outside tool is missing here, but fail it in CI (`CI=true`).

    scripts/bootstrap.sh installs the tools (Debian's prometheus, chromium, redis-server) where it
    runs as root; a CI that could not install them must not pass with their tests skipped.
    """
    if available:
        return
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"{reason} (CI runs every test: nothing may be skipped there)")
    pytest.skip(reason)
