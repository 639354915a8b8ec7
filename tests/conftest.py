"""Fixtures for end-to-end tests: a real redis-server, TorchServe, Celery workers and the API.

Redis and TorchServe run once per session; dispatcher processes (workers and API) start per
module (`stack`) or per test (`stack_factory`). Everything runs on 127.0.0.1 on free ports, in
pytest's temporary directories, and is stopped by PID at the end.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator, Mapping
from pathlib import Path

import pytest

from devstack import (
    PAYLOAD_MODULE,
    RedisServer,
    Stack,
    TorchServe,
    archive_demo_models,
    archive_model,
    start_stack,
)
from shared.settings import Settings

TEST_MODELS_DIR = Path(__file__).parent / "models"
TEST_MODELS = ("slow", "failing", "rejecting", "counting", "digest", "mirror", "headers")
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
    "image_info.mar",
    "grayscale.mar",
)
SLOW_WORKERS = 2
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Remember each phase's outcome on the test item, so fixtures can print the stack's logs
    # when the test itself failed.
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _failed(item: pytest.Item) -> bool:
    return any(report.failed for report in item.stash.get(_REPORTS, {}).values())


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server with AOF on; fault tests may stop, kill and restart it."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo and test models; `versioned` as versioned.mar (1.0) and versioned_v2.mar (2.0)."""
    store = tmp_path_factory.mktemp("model-store")
    archive_demo_models(store)
    # Every test model gets models/payload.py next to it, as the demo models do.
    for name in TEST_MODELS:
        archive_model(name, TEST_MODELS_DIR / f"{name}.py", store, extra_files=[PAYLOAD_MODULE])
    archive_model("versioned", TEST_MODELS_DIR / "versioned_v1.py", store, "1.0", [PAYLOAD_MODULE])
    archive_model(
        "versioned",
        TEST_MODELS_DIR / "versioned_v2.py",
        store,
        "2.0",
        [PAYLOAD_MODULE],
        mar_name="versioned_v2",
    )
    return store


@pytest.fixture(scope="session")
def counting_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file the `counting` model appends one JSON line to per request it receives."""
    return tmp_path_factory.mktemp("counting") / "requests.jsonl"


@pytest.fixture(scope="session")
def torchserve(
    tmp_path_factory: pytest.TempPathFactory, model_store: Path, counting_log: Path
) -> Iterator[TorchServe]:
    """TorchServe (no token auth) serving every demo and test model, `versioned` in 1.0 and 2.0.

    One worker per model, two for `slow` so a long request does not block every other one.
    """
    server = TorchServe(
        tmp_path_factory.mktemp("torchserve"),
        model_store,
        LOADED_AT_START,
        env={"COUNTING_MODEL_LOG": str(counting_log)},
    )
    with server:
        server.register("versioned_v2.mar")
        server.scale("slow", SLOW_WORKERS)
        yield server


def _ensure_redis(redis_server: RedisServer) -> None:
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
            _ensure_redis(self.redis_server)
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

    def logs(self) -> str:
        return "\n".join(stack.logs() for stack in self.stacks)


@pytest.fixture
def stack_factory(
    request: pytest.FixtureRequest, torchserve: TorchServe, tmp_path: Path
) -> Iterator[StackFactory]:
    """`stack_factory.start(workers=1, env={...}, concurrency=8)`; all stopped after the test.

    Its stacks get a private redis-server (`stack_factory.redis_server`, started on first use)
    unless `env` sets REDIS_URL: on the session's Redis, the workers of a module's `stack` would
    consume their queue too (one `dispatch` queue per Redis), with that stack's settings.
    """
    private_redis = RedisServer(tmp_path / "redis")
    factory = StackFactory(private_redis, torchserve, tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()
        private_redis.stop()
        if _failed(request.node):
            print(factory.logs())  # shown in the failure report's captured output


@pytest.fixture(scope="module")
def stack(
    redis_server: RedisServer,
    torchserve: TorchServe,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """A default stack (2 workers, 8 threads each) shared by a module's simple e2e tests."""
    factory = StackFactory(redis_server, torchserve, tmp_path_factory.mktemp("stack"))
    try:
        yield factory.start(workers=2)
    finally:
        factory.stop_all()


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


@pytest.fixture(scope="module")
def torchserve_factory(
    model_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TorchServeFactory]:
    """`torchserve_factory.start(models, workers=, job_queue_size=, counting_log=)`; module-wide."""
    factory = TorchServeFactory(model_store, tmp_path_factory.mktemp("dedicated-torchserve"))
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def dedicated_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server (AOF on) for tests that stop it or must see only their own keys.

    Request it before `stack_factory`, so the stack is stopped before this server.
    """
    with RedisServer(tmp_path / "dedicated-redis") as server:
        yield server


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No settings from this process's environment: only what the test passes counts."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)


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
