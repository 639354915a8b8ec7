"""REDIS_URL's two forms, the sentinel settings that go with them, and what the factories build
from each (shared/redis_url.py, shared/redis_connect.py, the settings' checks); no server."""

from __future__ import annotations

import asyncio
import socket

import pytest
import redis.asyncio as aioredis
import redis.asyncio.sentinel as async_sentinel
from pydantic import ValidationError

from shared.celery_app import PUBLISH_RETRY_POLICY, create_celery_app
from shared.redis_connect import (
    KEEPALIVE_OPTIONS,
    SENTINEL_TIMEOUT,
    async_client,
    celery_broker,
    sync_client,
)
from shared.redis_url import SentinelTarget, check_redis_url, parse_sentinel_url
from shared.settings import Settings

THREE = "sentinel://h1:26379;sentinel://h2:26380;sentinel://h3"


def build(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def test_the_sentinel_form_names_every_sentinel_with_the_default_port() -> None:
    target = parse_sentinel_url(THREE)
    assert target == SentinelTarget((("h1", 26379), ("h2", 26380), ("h3", 26379)), 0, None, None)


def test_the_db_and_password_may_be_on_any_part_and_reach_every_part_for_kombu() -> None:
    target = parse_sentinel_url("sentinel://h1:1;sentinel://:p%40ss%3Bw@h2:2/3;sentinel://h3:3/3")
    assert (target.db, target.username, target.password) == (3, None, "p@ss;w")
    # kombu reads the password and db from the first part only: every part carries them.
    assert target.broker_url() == (
        "sentinel://:p%40ss%3Bw@h1:1/3;sentinel://:p%40ss%3Bw@h2:2/3;sentinel://:p%40ss%3Bw@h3:3/3"
    )
    ipv6 = parse_sentinel_url("sentinel://user:pw@[::1]:5")
    assert ipv6.sentinels == (("::1", 5),)
    assert ipv6.broker_url() == "sentinel://user:pw@[::1]:5/0"


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("sentinel://h1:1;", "an empty part"),
        ("sentinel://h1:1;;sentinel://h2:2", "an empty part"),
        ("sentinel://h1:x", "part 1 is not a URL with host:port"),
        ("sentinel://h1:1;redis://h2:2", "part 2 is not sentinel://"),
        ("sentinel://:1", "part 1 names no host"),
        ("sentinel://h1:1/0;sentinel://h2:2/1", "different dbs"),
        ("sentinel://h1:1/zero", "the db must be a number"),
        ("sentinel://:a@h1:1;sentinel://:b@h2:2", "different passwords"),
        ("sentinel://h1:1;sentinel://h1:1", "named twice"),
        ("sentinel://h1:1?ssl=true", "query options"),
        ("sentinel://h1:0", "1-65535"),
    ],
)
def test_a_malformed_sentinel_url_is_refused_without_quoting_it(url: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as refused:
        parse_sentinel_url(url)
    assert "h1" not in str(refused.value)


def test_the_settings_need_a_master_name_with_sentinels_and_refuse_one_without() -> None:
    with pytest.raises(ValidationError, match="set REDIS_SENTINEL_MASTER"):
        build(redis_url=THREE)
    with pytest.raises(ValidationError, match="set REDIS_SENTINEL_MASTER"):
        build(redis_url=THREE, redis_sentinel_master="  ")
    with pytest.raises(ValidationError, match="are for a sentinel REDIS_URL"):
        build(redis_sentinel_master="mymaster")
    with pytest.raises(ValidationError, match="are for a sentinel REDIS_URL"):
        build(redis_sentinel_password="secret")
    with pytest.raises(ValidationError, match="REDIS_URL: redis://host:port/db"):
        build(redis_url="sentinal://h1:26379")
    for url in ("redis://:pw@h:1/2", "rediss://h:1", "unix:///tmp/redis.sock"):
        check_redis_url(url, master="", sentinel_password=False)


def test_no_password_reaches_an_error_message_or_the_settings_repr() -> None:
    with pytest.raises(ValidationError) as refused:
        build(redis_url="sentinel://:hunter2@h1:1;sentinel://:other@h2:2")
    assert "hunter2" not in str(refused.value)
    settings = build(
        redis_url=THREE, redis_sentinel_master="mymaster", redis_sentinel_password="s3cret"
    )
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in repr(create_celery_app(settings).conf.humanize(censored=True))


def test_empty_values_from_env_example_mean_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_SENTINEL_MASTER", "REDIS_SENTINEL_PASSWORD", "REDIS_MIN_REPLICAS"):
        monkeypatch.setenv(name, "")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.redis_sentinel_master is None
    assert settings.redis_sentinel_password is None
    assert settings.min_replicas == 0


def test_min_replicas_defaults_to_one_with_sentinel_and_zero_with_one_server() -> None:
    assert build().min_replicas == 0
    assert build(redis_url=THREE, redis_sentinel_master="m").min_replicas == 1
    assert build(redis_url=THREE, redis_sentinel_master="m", redis_min_replicas=2).min_replicas == 2
    assert build(redis_min_replicas=1).min_replicas == 1  # replicas without Sentinel
    with pytest.raises(ValidationError, match="REDIS_REPLICA_WAIT_MS must be below"):
        build(redis_replica_wait_ms=2000, redis_socket_timeout=1.5)


def test_the_broker_is_kombus_sentinel_transport_with_its_master_and_sentinel_password() -> None:
    settings = build(
        redis_url="sentinel://:data@h1:1;sentinel://h2:2/4",
        redis_sentinel_master="mymaster",
        redis_sentinel_password="sentinels",
    )
    url, options = celery_broker(settings)
    assert url == "sentinel://:data@h1:1/4;sentinel://:data@h2:2/4"
    assert options["master_name"] == "mymaster"
    sentinel_kwargs = options["sentinel_kwargs"]
    assert sentinel_kwargs["password"] == "sentinels"
    assert sentinel_kwargs["socket_timeout"] == SENTINEL_TIMEOUT
    assert sentinel_kwargs["retry"].get_retries() == 0
    app = create_celery_app(settings)
    transport = app.conf.broker_transport_options
    assert transport["master_name"] == "mymaster"
    assert transport["socket_keepalive"] is True
    assert transport["socket_timeout"] == 10
    assert app.conf.task_publish_retry_policy == PUBLISH_RETRY_POLICY
    with app.connection_for_write() as connection:
        assert connection.transport_cls == "sentinel"


def test_a_plain_url_keeps_its_broker_and_gains_keepalive() -> None:
    url, options = celery_broker(build(redis_url="redis://:pw@h:1/2"))
    assert url == "redis://:pw@h:1/2"
    assert options == {"socket_keepalive": True, "socket_keepalive_options": KEEPALIVE_OPTIONS}
    assert KEEPALIVE_OPTIONS[socket.TCP_KEEPIDLE] == 5


def test_the_api_pool_stays_a_blocking_one_of_its_size_on_both_forms() -> None:
    async def check() -> None:
        for settings in (build(), build(redis_url=THREE, redis_sentinel_master="m")):
            client = async_client(
                settings, socket_timeout=1.5, socket_connect_timeout=1, max_connections=7,
                pool_timeout=3,
            )  # fmt: skip
            pool = client.connection_pool
            assert isinstance(pool, aioredis.BlockingConnectionPool)
            assert (pool.max_connections, pool.timeout) == (7, 3)
            kwargs = pool.connection_kwargs
            assert kwargs["socket_keepalive"] is True
            assert kwargs["socket_keepalive_options"] == KEEPALIVE_OPTIONS
            assert kwargs["socket_timeout"] == 1.5
            await client.aclose()
        sentinel = build(redis_url=THREE, redis_sentinel_master="m")
        client = async_client(sentinel, socket_timeout=1, socket_connect_timeout=1)
        assert isinstance(client.connection_pool, async_sentinel.SentinelConnectionPool)
        assert not isinstance(client.connection_pool, aioredis.BlockingConnectionPool)
        await client.aclose()

    asyncio.run(check())


def test_sync_clients_get_keepalive_and_the_data_nodes_password_on_sentinel() -> None:
    settings = build(redis_url="sentinel://:data@h1:1", redis_sentinel_master="m")
    client = sync_client(settings, socket_timeout=5, socket_connect_timeout=5)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["password"], kwargs["db"], kwargs["socket_keepalive"]) == ("data", 0, True)
    client.close()
