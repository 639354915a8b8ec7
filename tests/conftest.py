"""Fixtures for end-to-end tests: a real redis-server, TorchServe, Celery workers and the API.

Redis and TorchServe run once per session; dispatcher processes (workers and API) start per
module (`stack`) or per test (`stack_factory`). Everything runs on 127.0.0.1 on free ports, in
pytest's temporary directories, and is stopped by PID at the end.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from devstack import (
    PAYLOAD_MODULE,
    RedisServer,
    Stack,
    TorchServe,
    archive_demo_models,
    archive_model,
)
from shared.settings import Settings
from tests.support.stack import (
    LOADED_AT_START,
    SLOW_WORKERS,
    STREAMING_WORKERS,
    TEST_MODELS,
    TEST_MODELS_DIR,
    StackFactory,
    TorchServeFactory,
)

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
        server.scale("streaming", STREAMING_WORKERS)
        yield server


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
    with factory.running(workers=2) as running:
        yield running


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
