"""`/ready` on Sentinel (api/readiness.py): it names the primary and the replicas the API counts,
says plainly when fewer acknowledge writes than submits wait for (and is 503 then, as the
submits are), and names the new primary after a failover. The real app in this process (ASGI),
a real topology (tests/support/sentinel.py), a stub TorchServe and a worker's heartbeat."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
import pytest

from api.main import create_app
from devstack import RedisServer
from shared.redis_state.keys import WORKERS_KEY
from shared.replica_wait import PROBE_TIMEOUT, REFRESH_SECONDS
from shared.settings import Settings
from tests.support.backend_stub import BackendStub
from tests.support.sentinel import HOST, SentinelTopology

T = TypeVar("T")
# A killed replica is found dead at the next count (each second): its PING is refused.
FOUND_DEAD = 2 * REFRESH_SECONDS + PROBE_TIMEOUT + 5.0
# After SENTINEL FAILOVER the sentinels name the new primary; the next count follows them, and
# the other replica is online again once Sentinel has pointed it at the new primary.
FOLLOWED = 2 * REFRESH_SECONDS + 30.0
ASYNC = {"Prefer": "respond-async"}


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    with SentinelTopology(tmp_path_factory.mktemp("sentinel-ready")) as topology:
        yield topology


@pytest.fixture(scope="module")
def torchserve() -> Iterator[BackendStub]:
    with BackendStub({("GET", "/ping"): (200, {})}) as stub:
        yield stub


@pytest.fixture
def config(
    topology: SentinelTopology, torchserve: BackendStub, clean_env: None
) -> Callable[..., Settings]:
    for node in topology.nodes:  # what an earlier test stopped
        if not node.alive:
            node.start()
    topology.settle()
    with topology.primary().client() as client:
        client.zadd(WORKERS_KEY, {"w1@host": time.time() + 3600})  # a live worker

    def build(**values: Any) -> Settings:
        return Settings(
            _env_file=None,  # type: ignore[call-arg]
            redis_url=topology.url,
            redis_sentinel_master=topology.master,
            torchserve_url=torchserve.url,
            **values,
        )

    return build


def run(main: Awaitable[T]) -> T:
    return asyncio.run(asyncio.wait_for(main, 120))


@asynccontextmanager
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


async def ready_when(
    http: httpx.AsyncClient, condition: Callable[[dict[str, Any]], bool], within: float
) -> tuple[int, dict[str, Any]]:
    """/ready's answer once `condition` holds of its body (asked every 0.2 s, bounded)."""
    deadline = time.monotonic() + within
    while True:
        response = await http.get("/ready")
        body = response.json()
        if condition(body):
            return response.status_code, body
        if time.monotonic() > deadline:
            raise AssertionError(f"/ready never met the condition in {within} s: {body}")
        await asyncio.sleep(0.2)


def address(node: RedisServer | Any) -> str:
    return f"{HOST}:{node.port}"


def test_ready_names_the_primary_and_the_replicas_it_waits_for(
    topology: SentinelTopology, config: Callable[..., Settings]
) -> None:
    async def main() -> httpx.Response:
        async with api(config()) as http:
            return await http.get("/ready")

    response = run(main())
    body = response.json()
    assert (response.status_code, body["ready"]) == (200, True), body
    assert body["checks"] == {"redis": "ok", "workers": "ok", "replicas": "ok", "torchserve": "ok"}
    redis = body["redis"]
    assert redis["primary"] == address(topology.primary())
    assert sorted(redis["replicas"]) == sorted(address(node) for node in topology.replicas())
    assert (redis["sentinel"], redis["replicas_needed"], redis["min_replicas"]) == (True, 2, 1)


def test_a_killed_replica_leaves_the_list_and_below_the_minimum_ready_says_so(
    topology: SentinelTopology, config: Callable[..., Settings]
) -> None:
    first, second = topology.replicas()

    async def main() -> dict[str, tuple[int, dict[str, Any]]]:
        seen: dict[str, tuple[int, dict[str, Any]]] = {}
        async with api(config()) as one, api(config(redis_min_replicas=2)) as two:
            await ready_when(one, lambda body: body["ready"], 10)
            first.kill()
            seen["one"] = await ready_when(
                one, lambda body: len(body["redis"]["replicas"]) == 1, FOUND_DEAD
            )
            seen["two"] = await ready_when(two, lambda body: not body["ready"], FOUND_DEAD)
            refused = await two.post(
                "/dispatch_model", json={"model_name": "echo", "input": {}}, headers=ASYNC
            )
            seen["two-submit"] = refused.status_code, refused.json()
            second.kill()
            seen["none"] = await ready_when(one, lambda body: not body["ready"], FOUND_DEAD)
        return seen

    seen = run(main())
    # One left of two, at least one needed: still ready, the dead one no longer listed.
    status, body = seen["one"]
    assert status == 200, body
    assert body["redis"]["replicas"] == [address(second)]
    assert body["checks"]["replicas"] == "ok"
    # At least two needed: not ready, and a submit answers 503 as /ready said.
    status, body = seen["two"]
    assert status == 503
    assert body["checks"]["replicas"] == (
        "1 of at least 2 replicas acknowledge writes: submits answer 503"
    )
    assert body["redis"]["replicas_needed"] == 2
    assert seen["two-submit"][0] == 503
    assert seen["two-submit"][1]["code"] == "queue_unavailable"
    # None left.
    status, body = seen["none"]
    assert status == 503
    assert body["checks"]["replicas"] == (
        "0 of at least 1 replica acknowledge writes: submits answer 503"
    )
    assert body["checks"]["redis"] == "ok"  # the primary itself still takes writes
    assert body["redis"]["replicas"] == []


def test_after_a_failover_ready_names_the_new_primary(
    topology: SentinelTopology, config: Callable[..., Settings]
) -> None:
    old = topology.primary()

    async def main() -> tuple[dict[str, Any], str, tuple[int, dict[str, Any]]]:
        async with api(config()) as http:
            _, before = await ready_when(http, lambda body: body["ready"], 10)
            new = address(await asyncio.to_thread(topology.failover))
            after = await ready_when(
                http, lambda body: body["redis"]["primary"] == new and body["ready"], FOLLOWED
            )
            return before, new, after

    before, new, (status, after) = run(main())
    assert before["redis"]["primary"] == address(old)
    assert new != address(old)
    assert status == 200, after
    assert after["redis"]["primary"] == new
    assert new not in after["redis"]["replicas"]
