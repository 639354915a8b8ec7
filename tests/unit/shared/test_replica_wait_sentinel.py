"""An accepted submit is never lost to a failover (shared/replica_wait.py), through the real app
(ASGI, in this process, no worker needed for a 202) on a real Sentinel topology
(tests/support/sentinel.py): a 202 only once every live replica holds the write; a frozen
replica refuses submits until it is found dead; one replica killed, submits go on; both killed,
503s within the bound and an Idempotency-Key retry answers the same task once it is safe; a
manual failover under submits loses none of the 202s."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from api.main import create_app
from devstack import RedisServer, free_port
from shared.redis_state.keys import batch_key, task_key
from shared.replica_wait import LAG_LIMIT, PROBE_TIMEOUT, REFRESH_SECONDS
from shared.settings import Settings
from tests.support.sentinel import Node, SentinelTopology

T = TypeVar("T")
WAIT_MS = 500
# A refused submit answers within the WAIT timeout plus this (the call, the ASGI round trip).
ANSWER_MARGIN = 1.0
# A replica found dead: the next count (each second) sees it gone and its PING refused.
FOUND_DEAD = 2 * REFRESH_SECONDS + PROBE_TIMEOUT + 5.0
ASYNC = {"Prefer": "respond-async"}
# Submits accepted after the switch before the manual-failover test checks them all.
AFTER_SWITCH = 50


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    with SentinelTopology(tmp_path_factory.mktemp("sentinel-wait")) as topology:
        yield topology


@pytest.fixture
def settings(topology: SentinelTopology, clean_env: None) -> Settings:
    for node in topology.nodes:  # what an earlier test stopped
        if node.frozen:
            node.thaw()
        if not node.alive:
            node.start()
    topology.settle()
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=topology.url,
        redis_sentinel_master=topology.master,
        redis_replica_wait_ms=WAIT_MS,
        torchserve_url=f"http://127.0.0.1:{free_port()}",
    )


def run(main: Awaitable[T]) -> T:
    return asyncio.run(asyncio.wait_for(main, 120))


@asynccontextmanager
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


async def submit(
    http: httpx.AsyncClient, n: int = 0, headers: dict[str, str] | None = None
) -> httpx.Response:
    body = {"model_name": "echo", "input": {"n": n}}
    return await http.post("/dispatch_model", json=body, headers={**ASYNC, **(headers or {})})


def holds(node: Node, *keys: str) -> bool:
    with node.client() as client:
        return bool(client.exists(*keys) == len(keys))


def refused(response: httpx.Response) -> bool:
    return response.status_code == 503 and response.json()["code"] == "queue_unavailable"


def test_a_submit_is_answered_only_once_every_replica_holds_it(
    topology: SentinelTopology, settings: Settings
) -> None:
    replicas = topology.replicas()

    async def main() -> None:
        async with api(settings) as http:
            for n in range(10):  # one at a time: each its own script call
                response = await submit(http, n)
                assert response.status_code == 202, response.text
                key = task_key(response.json()["task_id"])
                assert all(holds(replica, key) for replica in replicas)
            together = await asyncio.gather(*(submit(http, n) for n in range(40)))
            assert {response.status_code for response in together} == {202}
            keys = [task_key(response.json()["task_id"]) for response in together]
            assert all(holds(replica, *keys) for replica in replicas)  # group-committed
            requests = [{"custom_id": str(i), "model_name": "echo", "input": i} for i in range(600)]
            batch = await http.post("/batches", json={"requests": requests})
            assert batch.status_code == 202, batch.text[:300]
            assert all(holds(replica, batch_key(batch.json()["batch_id"])) for replica in replicas)

    run(main())


def test_a_frozen_replica_refuses_submits_until_it_is_found_dead(
    topology: SentinelTopology, settings: Settings
) -> None:
    """Acks from one replica are not enough while the other is live: a frozen replica is still
    online at the primary, so the first submits are 503s; once it stops acknowledging
    (LAG_LIMIT) and its PING goes unanswered it no longer counts, and the other's ack does."""
    frozen, other = topology.replicas()

    async def main() -> None:
        async with api(settings) as http:
            assert (await submit(http)).status_code == 202  # both counted
            frozen.freeze()
            frozen_at = time.monotonic()
            first = await submit(http)
            assert refused(first), first.text
            assert "may not survive a failover" in first.json()["msg"]
            assert "Idempotency-Key" in first.json()["msg"]
            deadline = frozen_at + LAG_LIMIT + FOUND_DEAD
            while time.monotonic() < deadline:
                response = await submit(http)
                if response.status_code == 202:
                    assert holds(other, task_key(response.json()["task_id"]))
                    return
                assert refused(response), response.text
            pytest.fail("submits were still refused with the frozen replica found dead")

    try:
        run(main())
    finally:
        frozen.thaw()


def test_one_replica_killed_submits_go_on(topology: SentinelTopology, settings: Settings) -> None:
    killed, survivor = topology.replicas()

    async def main() -> None:
        async with api(settings) as http:
            assert (await submit(http)).status_code == 202
            killed.kill()
            killed_at = time.monotonic()
            accepted = 0
            while accepted < 10:
                assert time.monotonic() - killed_at < FOUND_DEAD, "submits are still refused"
                response = await submit(http)
                if response.status_code == 202:
                    accepted += 1
                    assert holds(survivor, task_key(response.json()["task_id"]))
                else:
                    assert refused(response), response.text  # before the next count

    run(main())


def test_both_replicas_killed_submits_are_503s_and_a_keyed_retry_is_safe(
    topology: SentinelTopology, settings: Settings
) -> None:
    primary = topology.primary()
    replicas = topology.replicas()
    key = uuid.uuid4().hex

    async def main() -> None:
        async with api(settings) as http:
            assert (await submit(http)).status_code == 202
            for replica in replicas:
                replica.kill()
            answers: list[httpx.Response] = []
            for n in range(6):
                started = time.monotonic()
                answers.append(await submit(http, n))
                assert time.monotonic() - started < WAIT_MS / 1000 + ANSWER_MARGIN
            one = {"custom_id": "only", "model_name": "echo", "input": 1}
            batch = await http.post("/batches", json={"requests": [one]})
            assert all(refused(response) for response in [*answers, batch]), batch.text[:300]
            with primary.client() as client:
                before = set(client.scan_iter(task_key("*")))
            keyed = await submit(http, 99, {"Idempotency-Key": key})
            assert refused(keyed), keyed.text
            with primary.client() as client:
                written = set(client.scan_iter(task_key("*"))) - before
            assert len(written) == 1  # on the primary, not yet on a replica: not answered 202
            for replica in replicas:
                await asyncio.to_thread(replica.start)
            await asyncio.to_thread(topology.settle)
            retry = await submit(http, 99, {"Idempotency-Key": key})
            assert retry.status_code == 202, retry.text
            assert retry.headers["Idempotent-Replayed"] == "true"
            assert {task_key(retry.json()["task_id"])} == written
            assert all(holds(replica, *written) for replica in replicas)

    run(main())


def test_replicas_without_sentinel_are_waited_for_too(
    topology: SentinelTopology, settings: Settings, tmp_path: Path
) -> None:
    """REDIS_MIN_REPLICAS on a plain URL: the primary's replicas are counted and waited for
    the same way; a server without any is a 503 for every submit."""
    primary, replicas = topology.primary(), topology.replicas()
    plain = {"redis_sentinel_master": None, "redis_min_replicas": 1}
    on_primary = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{primary.port}/0"})
    with RedisServer(tmp_path / "alone", appendonly=False) as alone:
        lone = settings.model_copy(update={"redis_url": alone.url})

        async def main() -> None:
            async with api(on_primary.model_copy(update=plain)) as http:
                response = await submit(http)
                assert response.status_code == 202, response.text
                key = task_key(response.json()["task_id"])
                assert all(holds(replica, key) for replica in replicas)
            async with api(lone.model_copy(update=plain)) as http:
                started = time.monotonic()
                response = await submit(http)
                assert refused(response), response.text
                assert time.monotonic() - started < WAIT_MS / 1000 + ANSWER_MARGIN

        run(main())


def test_a_manual_failover_under_submits_loses_no_202(
    topology: SentinelTopology, settings: Settings
) -> None:
    accepted: list[str] = []
    statuses: list[int] = []
    after_switch = asyncio.Event()  # set once AFTER_SWITCH more were accepted after the switch
    target = {"accepted": math.inf}

    async def load(http: httpx.AsyncClient, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            response = await submit(http, n)
            statuses.append(response.status_code)
            if response.status_code == 202:
                accepted.append(response.json()["task_id"])
                if len(accepted) >= target["accepted"]:
                    after_switch.set()
            else:
                assert refused(response), response.text

    async def main() -> None:
        async with api(settings) as http:
            stop = asyncio.Event()
            writers = [asyncio.create_task(load(http, stop)) for _ in range(4)]
            await asyncio.sleep(1)
            new = await asyncio.to_thread(topology.failover)
            target["accepted"] = len(accepted) + AFTER_SWITCH
            try:  # submits go on, now to the new primary
                await asyncio.wait_for(after_switch.wait(), 30)
            finally:
                stop.set()
                await asyncio.gather(*writers)
            # The new primary is what survives: every 202 must be there (the old primary and
            # the other replica resync from it, dropping whatever they had that it lacks).
            keys = [task_key(task_id) for task_id in accepted]
            with new.client() as client, client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.exists(key)
                there = pipe.execute()
            missing = [key for key, found in zip(keys, there, strict=True) if not found]
            assert not missing, f"{len(missing)} of {len(keys)} accepted submits lost"

    run(main())
    print(f"\nmanual failover: {statuses.count(202)} accepted, {statuses.count(503)} refused")
