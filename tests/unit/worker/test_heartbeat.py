"""The heartbeat's registry on a real redis-server: a worker's description for the console, and
workers that left or died moving to the gone set with their last beat."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import redis

from devstack.redis import RedisServer
from shared.redis_state.keys import (
    GONE_WORKERS_KEY,
    GONE_WORKERS_SECONDS,
    LIVE_BEATS,
    STALE_BEATS,
    WORKERS_KEY,
    worker_info_key,
)
from shared.settings import Settings
from worker import heartbeat


@pytest.fixture
def r(bare_redis: RedisServer) -> Iterator[redis.Redis]:
    client = bare_redis.client(decode_responses=True)
    client.flushall()
    yield client
    client.close()


def test_a_beat_describes_the_worker(r: redis.Redis) -> None:
    queues = SimpleNamespace(consume_from={"dispatch": 1, "dispatch.batch": 2})
    sender = SimpleNamespace(app=SimpleNamespace(amqp=SimpleNamespace(queues=queues)))
    info = heartbeat.describe(sender, Settings(worker_max_in_flight=64))
    heartbeat._beat_once(r, "w1@host", 2.0, info)
    stored = r.hgetall(worker_info_key("w1@host"))
    assert stored["queues"] == "dispatch,dispatch.batch"
    assert stored["slots"] == "64"
    assert int(stored["pid"]) > 0
    assert stored["in_flight"] == ""  # no engine in this process
    assert 0 < r.ttl(worker_info_key("w1@host")) <= LIVE_BEATS * 2
    assert r.zscore(WORKERS_KEY, "w1@host") is not None


def test_a_dead_worker_moves_to_the_gone_set(r: redis.Redis) -> None:
    interval = 1.0
    last_beat = time.time() - STALE_BEATS * interval - 5
    r.zadd(WORKERS_KEY, {"dead@host": last_beat})
    heartbeat._beat_once(r, "w1@host", interval)
    assert r.zscore(WORKERS_KEY, "dead@host") is None
    assert r.zscore(GONE_WORKERS_KEY, "dead@host") == pytest.approx(last_beat)
    # Gone for longer than GONE_WORKERS_SECONDS: dropped by the next beat.
    r.zadd(GONE_WORKERS_KEY, {"old@host": time.time() - GONE_WORKERS_SECONDS - 1})
    heartbeat._beat_once(r, "w1@host", interval)
    assert r.zscore(GONE_WORKERS_KEY, "old@host") is None
    assert r.zscore(GONE_WORKERS_KEY, "dead@host") is not None


def test_a_worker_that_comes_back_leaves_the_gone_set(r: redis.Redis) -> None:
    r.zadd(GONE_WORKERS_KEY, {"w1@host": time.time() - 100})
    heartbeat._beat_once(r, "w1@host", 1.0)
    assert r.zscore(GONE_WORKERS_KEY, "w1@host") is None
    assert r.zscore(WORKERS_KEY, "w1@host") is not None
