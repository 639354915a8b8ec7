"""The webhook consumer's outbox (worker/webhooks.py) on Sentinel: its client comes from
shared/redis_connect.py, so it runs its scripts on the primary the sentinels name, and on the
new one after a failover. A real topology (tests/support/sentinel.py), 1 primary, 1 replica."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest
import redis

from devstack.processes import free_port
from shared.redis_state.keys import DUE_KEY, event_key
from shared.settings import Settings
from tests.support.sentinel import SentinelTopology
from worker.webhooks import Outbox

# The sentinels name the new primary at once; a connection still on the old one is dropped
# when that node refuses the write (READONLY: Sentinel demotes it within ~10 s on Redis 6.2).
FOLLOWED = 30.0


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    with SentinelTopology(tmp_path_factory.mktemp("sentinel-webhooks"), replicas=1) as topology:
        yield topology


def due(topology: SentinelTopology, event_id: str) -> None:
    """An event (its hash, as the task scripts emit it) due now, written on the primary."""
    with topology.primary().client() as client:
        client.hset(event_key(event_id), mapping={"state": "pending", "ticket": 0})
        client.zadd(DUE_KEY, {event_id: time.time() - 1})


def test_the_outbox_follows_the_primary_through_a_failover(
    topology: SentinelTopology, clean_env: None
) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=topology.url,
        redis_sentinel_master=topology.master,
        torchserve_url=f"http://127.0.0.1:{free_port()}",
    )
    outbox = Outbox(settings)
    try:
        due(topology, "event-1")
        assert [event for event, _ in outbox.promote()] == ["event-1"]

        topology.failover()
        due(topology, "event-2")  # on the new primary only: the old one is a replica soon
        deadline = time.monotonic() + FOLLOWED
        promoted: list[str] = []
        while not promoted:
            if time.monotonic() > deadline:
                raise AssertionError("the outbox never read the new primary's due events")
            # READONLY from the old primary once demoted, then a new connection.
            with contextlib.suppress(redis.RedisError):
                promoted = [event for event, _ in outbox.promote()]
            time.sleep(0.2)
        assert promoted == ["event-2"]  # event-1 is leased: not due again for QUEUE_LEASE
    finally:
        outbox.redis.close()
