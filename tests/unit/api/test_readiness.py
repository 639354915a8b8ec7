"""`/ready` against a real redis-server: queued work is counted in tasks; the server is named.

A Celery message carries 1..MESSAGE_MAX_TASKS tasks, so the length of a queue's list is not the
number of tasks waiting; /ready reads the same per-class counters as the 429 limit.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from api.main import create_app
from api.readiness import STALL_SECONDS, _check_redis_and_workers
from devstack import RedisServer
from shared.redis_state.keys import LAST_FINISHED_KEY, WORKERS_KEY, queued_key
from shared.settings import Settings
from tests.support.backend_stub import BackendStub

PASSWORD = "ready-test-password-1"


@pytest.fixture
def redis_url(dedicated_redis: RedisServer) -> str:
    return dedicated_redis.url


def _check(url: str) -> dict[str, str]:
    async def run() -> dict[str, str]:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            state = SimpleNamespace(store=SimpleNamespace(redis=client), settings=Settings())
            return await _check_redis_and_workers(state)
        finally:
            await client.aclose()

    return asyncio.run(run())


def _stalled_redis(url: str, message: str, queued_tasks: int) -> None:
    """A live worker, nothing finished for longer than STALL_SECONDS, one message in the list."""
    client = redis.Redis.from_url(url)
    client.zadd(WORKERS_KEY, {"w1@host": time.time()})
    client.set(LAST_FINISHED_KEY, time.time() - STALL_SECONDS - 5)
    client.lpush("dispatch", message)
    client.set(queued_key("dispatch"), queued_tasks)


def test_stalled_workers_are_reported_with_the_queued_task_count(
    redis_url: str, clean_env: None
) -> None:
    # One message in the list, carrying 3 tasks: the counter says 3.
    _stalled_redis(redis_url, "a-message-of-three-tasks", 3)
    checks = _check(redis_url)
    assert checks["redis"] == "ok"
    assert checks["workers"].startswith("tasks queued (3 task(s) in dispatch)"), checks


def test_an_empty_counter_is_not_a_stall_whatever_the_lists_hold(
    redis_url: str, clean_env: None
) -> None:
    # A message whose tasks all left `queued` (canceled meanwhile) still sits in the list.
    _stalled_redis(redis_url, "a-message-of-canceled-tasks", 0)
    assert _check(redis_url) == {"redis": "ok", "workers": "ok"}


def test_a_plain_url_names_the_primary_alone_and_never_its_password(
    tmp_path: Path, clean_env: None
) -> None:
    """One server, REDIS_MIN_REPLICAS 0: the checks as before, `redis` naming the server."""
    with RedisServer(tmp_path / "redis", password=PASSWORD) as server:
        with server.client() as client:
            client.zadd(WORKERS_KEY, {"w1@host": time.time() + 3600})  # a live worker
        with BackendStub({("GET", "/ping"): (200, {})}) as torchserve:
            config = Settings(
                _env_file=None,  # type: ignore[call-arg]
                redis_url=server.url,
                torchserve_url=torchserve.url,
            )

            async def main() -> httpx.Response:
                app = create_app(config)
                async with app.router.lifespan_context(app):
                    transport = httpx.ASGITransport(app=app)
                    async with httpx.AsyncClient(transport=transport, base_url="http://a") as http:
                        return await http.get("/ready")

            response = asyncio.run(main())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["checks"] == {"redis": "ok", "workers": "ok", "torchserve": "ok"}
    assert body["redis"] == {
        "primary": f"127.0.0.1:{server.port}",
        "sentinel": False,
        "replicas": None,
        "replicas_needed": 0,
        "min_replicas": 0,
    }
    assert PASSWORD in server.url
    assert PASSWORD not in response.text
