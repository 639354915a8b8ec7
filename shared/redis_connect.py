"""Where every process gets its Redis clients: one server or a Sentinel-watched primary, alike.

The API, the workers' engine and heartbeat, the webhook consumer and the Celery broker all build
their clients here, from REDIS_URL (shared/redis_url.py), so that a switch to Sentinel reaches
every one of them: with the sentinel form, a client is `master_for(REDIS_SENTINEL_MASTER)`, whose
every new connection asks the sentinels for the current primary, and a connection that finds
its node demoted (READONLY) is dropped and made again; the Celery broker is kombu's sentinel
transport with the same sentinels and passwords. Each caller keeps its own timeouts and retries.

Every connection gets TCP keepalive (a lost machine is noticed on an idle connection within
~11 s) next to its socket timeout (a frozen node that still holds the connection open is
noticed on the next command): without both, a client can wait forever on a primary that is
gone (celery#6348). A sentinel query has a short timeout and no retry of its own, so a dead
sentinel costs one second before the next one is asked, not redis-py's default ten retries.
"""

from __future__ import annotations

import socket
from typing import Any, cast

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as async_sentinel
import redis.sentinel as sync_sentinel
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.redis_url import SentinelTarget, is_sentinel_url, parse_sentinel_url
from shared.settings import Settings

# Idle 5 s, then a probe every 2 s, 3 unanswered: a dead peer is noticed within ~11 s.
KEEPALIVE_OPTIONS: dict[int, int] = {
    option: value
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3))
    if (option := getattr(socket, name, None)) is not None
}
KEEPALIVE: dict[str, Any] = {
    "socket_keepalive": True,
    "socket_keepalive_options": KEEPALIVE_OPTIONS,
}
# One query of one sentinel (connect, or SENTINEL MASTERS).
SENTINEL_TIMEOUT = 1.0


def async_client(
    settings: Settings,
    *,
    socket_timeout: float,
    socket_connect_timeout: float,
    decode_responses: bool = True,
    health_check_interval: float = 0,
    retry: AsyncRetry | None = None,
    retry_on_error: list[type[Exception]] | None = None,
    client_name: str | None = None,
    max_connections: int | None = None,
    pool_timeout: float | None = None,
) -> aioredis.Redis:
    """An asyncio client of the primary. `pool_timeout`: a blocking pool of `max_connections`
    that waits this long for a free connection (else a pool that opens what it needs)."""
    options = _options(
        socket_timeout, socket_connect_timeout, decode_responses, health_check_interval,
        client_name, retry_on_error, max_connections, pool_timeout,
    )  # fmt: skip
    if retry is not None:
        options["retry"] = retry
    blocking = pool_timeout is not None
    if not is_sentinel_url(settings.redis_url):
        pool_class = aioredis.BlockingConnectionPool if blocking else aioredis.ConnectionPool
        return aioredis.Redis.from_pool(pool_class.from_url(settings.redis_url, **options))
    target = parse_sentinel_url(settings.redis_url)
    sentinel = async_sentinel.Sentinel(  # type: ignore[no-untyped-call]
        target.sentinels,
        sentinel_kwargs=_sentinel_kwargs(settings, AsyncRetry(NoBackoff(), 0)),
        **_credentials(target),
    )
    return cast(
        aioredis.Redis,
        sentinel.master_for(
            _master(settings),
            redis_class=aioredis.Redis,
            connection_pool_class=_AsyncBlockingSentinelPool if blocking else _AsyncSentinelPool,
            **options,
        ),
    )


def sync_client(
    settings: Settings,
    *,
    socket_timeout: float,
    socket_connect_timeout: float,
    decode_responses: bool = False,
    client_name: str | None = None,
) -> redis.Redis:
    """A synchronous client of the primary (the heartbeat, the webhook consumer)."""
    options = _options(
        socket_timeout, socket_connect_timeout, decode_responses, 0, client_name, None, None, None
    )
    if not is_sentinel_url(settings.redis_url):
        return redis.Redis.from_pool(redis.ConnectionPool.from_url(settings.redis_url, **options))
    target = parse_sentinel_url(settings.redis_url)
    sentinel = sync_sentinel.Sentinel(  # type: ignore[no-untyped-call]
        target.sentinels,
        sentinel_kwargs=_sentinel_kwargs(settings, Retry(NoBackoff(), 0)),
        **_credentials(target),
    )
    return cast(
        redis.Redis,
        sentinel.master_for(  # type: ignore[no-untyped-call]
            _master(settings),
            redis_class=redis.Redis,
            connection_pool_class=_SyncSentinelPool,
            **options,
        ),
    )


def celery_broker(settings: Settings) -> tuple[str, dict[str, Any]]:
    """The Celery broker URL, and the transport options it needs beside the app's own: kombu's
    sentinel transport (`sentinel://` parts, `master_name`, `sentinel_kwargs`) on Sentinel."""
    options: dict[str, Any] = dict(KEEPALIVE)
    if not is_sentinel_url(settings.redis_url):
        return settings.redis_url, options
    target = parse_sentinel_url(settings.redis_url)
    options["master_name"] = _master(settings)
    options["sentinel_kwargs"] = _sentinel_kwargs(settings, Retry(NoBackoff(), 0))
    return target.broker_url(), options


def node_client(settings: Settings, host: str, port: int, *, timeout: float) -> aioredis.Redis:
    """A client of one data node by address (a replica the primary named), with REDIS_URL's
    credentials and TLS, that fails within `timeout` and does not retry; the caller closes it."""
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": AsyncRetry(NoBackoff(), 0),
        **KEEPALIVE,
    }
    if is_sentinel_url(settings.redis_url):
        options.update(_credentials(parse_sentinel_url(settings.redis_url)))
    else:
        url_options: dict[str, Any] = dict(parse_url(settings.redis_url))
        if "path" in url_options:  # a unix socket: the replica is at a TCP address
            url_options.pop("path")
            url_options.pop("connection_class", None)
        options.update(url_options)
    options.update(host=host, port=port)
    return aioredis.Redis.from_pool(aioredis.ConnectionPool(**options))


def on_sentinel(client: aioredis.Redis) -> bool:
    """Whether `client` follows a Sentinel-watched primary (else: one server, nothing to follow)."""
    return isinstance(client.connection_pool, _AsyncSentinelPool)


async def follow_primary(client: aioredis.Redis) -> bool:
    """On Sentinel, ask the sentinels where the primary is now and drop every connection of
    `client` that is elsewhere, in use or not, so that none goes on writing to a node that is
    being demoted (Sentinel turns a live old primary into a replica only some seconds later;
    until then it takes writes that the switch will drop). True when one was dropped."""
    pool = client.connection_pool
    if not isinstance(pool, _AsyncSentinelPool):
        return False
    before = pool.master_address
    now = await pool.get_master_address()  # type: ignore[no-untyped-call]
    # Idle ones were dropped above if the address changed; a request's connection is dropped
    # when it is released (_AsyncSentinelPool.release), a subscriber's here.
    elsewhere = [
        connection
        for connection in pool._get_in_use_connections()  # redis-py has no public list
        if connection.is_connected and _address(connection) != now
    ]
    for connection in elsewhere:
        await connection.disconnect()
    return bool(elsewhere) or (before is not None and before != now)


def _address(connection: Any) -> tuple[str, int]:
    return connection.host, connection.port


def _options(
    socket_timeout: float,
    socket_connect_timeout: float,
    decode_responses: bool,
    health_check_interval: float,
    client_name: str | None,
    retry_on_error: list[type[Exception]] | None,
    max_connections: int | None,
    pool_timeout: float | None,
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "decode_responses": decode_responses,
        **KEEPALIVE,
    }
    if health_check_interval:
        options["health_check_interval"] = health_check_interval
    if client_name is not None:
        options["client_name"] = client_name
    if retry_on_error is not None:
        options["retry_on_error"] = retry_on_error
    if max_connections is not None:
        options["max_connections"] = max_connections
    if pool_timeout is not None:
        options["timeout"] = pool_timeout
    return options


def _master(settings: Settings) -> str:
    if not settings.redis_sentinel_master:  # the settings refuse this; a guard for mypy
        raise ValueError("REDIS_URL names sentinels but REDIS_SENTINEL_MASTER is empty")
    return settings.redis_sentinel_master


def _credentials(target: SentinelTarget) -> dict[str, Any]:
    """The data nodes' db and credentials (from the sentinel URL's parts)."""
    found: dict[str, Any] = {"db": target.db}
    if target.username:
        found["username"] = target.username
    if target.password:
        found["password"] = target.password
    return found


def _sentinel_kwargs(settings: Settings, retry: Retry | AsyncRetry) -> dict[str, Any]:
    """How to talk to the sentinels themselves: short timeouts, no retry, their password."""
    kwargs: dict[str, Any] = {
        "socket_timeout": SENTINEL_TIMEOUT,
        "socket_connect_timeout": SENTINEL_TIMEOUT,
        "retry": retry,
        **KEEPALIVE,
    }
    if settings.redis_sentinel_password is not None:
        kwargs["password"] = settings.redis_sentinel_password.get_secret_value()
    return kwargs


class _AsyncSentinelPool(async_sentinel.SentinelConnectionPool):
    """redis-py's, but a connection released while the sentinels name another primary is
    dropped rather than kept for the next command (redis-py's sync pool does so, not its
    asyncio one), and closing the client closes its sentinels' connections too (they belong to
    this client alone: one Sentinel per client)."""

    async def release(self, connection: AbstractConnection) -> None:
        primary = self.master_address
        if primary is not None and connection.is_connected and _address(connection) != primary:
            await connection.disconnect()
        await super().release(connection)

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # the client's close (a move of the primary drops idle ones only)
            await self.sentinel_manager.aclose()


class _AsyncBlockingSentinelPool(_AsyncSentinelPool, aioredis.BlockingConnectionPool):
    """The API's pool on Sentinel: at most `max_connections`, waiting for a free one."""


class _SyncSentinelPool(sync_sentinel.SentinelConnectionPool):
    """The synchronous twin of _AsyncSentinelPool."""

    def disconnect(self, inuse_connections: bool = True) -> None:
        super().disconnect(inuse_connections)
        if inuse_connections:
            self.sentinel_manager.close()
