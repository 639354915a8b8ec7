"""The settings that say where Redis is and what a write must reach: REDIS_*.

A base of `Settings` (shared/settings.py), which every process reads, above BackendSettings
(its fields come first in the docs, in this order); here so that the Redis knobs and their
checks sit together: the URL's form (shared/redis_url.py), Sentinel's master and password, and
what a submit waits for (shared/replica_wait.py, shared/wait_aof.py).
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator

from shared.backend_settings import BackendSettings
from shared.redis_url import check_redis_url, is_sentinel_url


class RedisSettings(BackendSettings):
    """REDIS_URL, REDIS_SOCKET_TIMEOUT, REDIS_SENTINEL_*, REDIS_MIN_REPLICAS, REDIS_REPLICA_WAIT_MS
    and REDIS_WAIT_AOF."""

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Broker and task store: `redis://:password@host:port/db`, `rediss://` for TLS, "
        "or Celery's sentinel form `sentinel://:password@h1:26379;sentinel://h2:26379/db`.",
    )
    redis_socket_timeout: float = Field(
        1.5,
        gt=0,
        description="API-side Redis socket timeout (s): a Redis outage is a 503 within ~2 s "
        "instead of a hang.",
    )
    redis_sentinel_master: str | None = Field(
        None,
        description="With a sentinel `REDIS_URL`: the name the sentinels monitor the primary "
        "under; required then.",
    )
    redis_sentinel_password: SecretStr | None = Field(
        None,
        description="The sentinels' own password, if they have one (the data nodes' goes in "
        "`REDIS_URL`).",
    )
    redis_min_replicas: int | None = Field(
        None,
        ge=0,
        le=16,
        description="Replicas a submit must reach (WAIT) before it is answered 200/202: every "
        "live replica, and at least this many, else a 503. Empty: 1 with Sentinel, 0 (no WAIT) "
        "with one server.",
    )
    redis_replica_wait_ms: int = Field(
        500,
        ge=10,
        le=10_000,
        description="How long a submit waits for its replicas (ms) before it is a 503; below "
        "`REDIS_SOCKET_TIMEOUT`.",
    )
    redis_wait_aof: Literal["off", "replicas", "all"] = Field(
        "off",
        description="Redis 7.2+ (WAITAOF; refused at start by an older server): `replicas`: a "
        "submit waits until its replicas have it fsynced to their append-only files, not only "
        "received; `all`: and the primary's own AOF (appendonly yes there). `off`: WAIT.",
    )

    @field_validator(
        "redis_sentinel_master", "redis_sentinel_password", "redis_min_replicas", mode="before"
    )
    @classmethod
    def _empty_is_default(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _consistent_redis(self) -> Self:
        check_redis_url(
            self.redis_url,
            master=self.redis_sentinel_master or "",
            sentinel_password=self.redis_sentinel_password is not None,
        )
        if self.redis_replica_wait_ms >= 1000 * self.redis_socket_timeout:
            raise ValueError("REDIS_REPLICA_WAIT_MS must be below REDIS_SOCKET_TIMEOUT")
        if self.redis_wait_aof == "replicas" and self.min_replicas == 0:
            raise ValueError(
                "REDIS_WAIT_AOF=replicas needs REDIS_MIN_REPLICAS of 1 or more (else no submit "
                "waits for a replica); `all` waits for the primary's own AOF too"
            )
        return self

    @property
    def min_replicas(self) -> int:
        """REDIS_MIN_REPLICAS, or its default: 1 with Sentinel, 0 with one server."""
        if self.redis_min_replicas is not None:
            return self.redis_min_replicas
        return 1 if is_sentinel_url(self.redis_url) else 0
