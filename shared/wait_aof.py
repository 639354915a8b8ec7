"""WAITAOF (Redis 7.2+), as REDIS_WAIT_AOF asks for it: can the primary give it; its reply.

`WAITAOF numlocal numreplicas timeout` blocks until the connection's writes are fsynced to the
append-only file of the primary (numlocal 1) and of `numreplicas` replicas, or the timeout, and
answers [primaries, replicas] that did. An older server refuses the command, so every submit
would fail: the API checks the version (INFO server redis_version) at start and refuses to start
naming it (check_wait_aof), and shared/replica_wait.py checks again on each new primary.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from shared.settings import Settings

# The first Redis with WAITAOF.
WAITAOF_SINCE = (7, 2)


class WaitAofUnsupported(ValueError):
    """REDIS_WAIT_AOF asks for what the primary cannot do (WAITAOF before 7.2, or `all` with its
    append-only file off): a settings error, raised at start."""


async def check_wait_aof(client: aioredis.Redis, settings: Settings) -> None:
    """Raise WaitAofUnsupported, naming the server's version, when REDIS_WAIT_AOF asks for
    what the primary cannot do: better than every submit failing."""
    refusal = await wait_aof_refusal(client, settings)
    if refusal is not None:
        raise WaitAofUnsupported(refusal)


async def wait_aof_refusal(client: aioredis.Redis, settings: Settings) -> str | None:
    """Why the primary cannot give REDIS_WAIT_AOF, or None (also when it asks for nothing)."""
    if settings.redis_wait_aof == "off":
        return None
    info = await client.info("server")
    version = str(info.get("redis_version", "0"))
    if parse_version(version) < WAITAOF_SINCE:
        return (
            f"REDIS_WAIT_AOF={settings.redis_wait_aof} needs WAITAOF (Redis 7.2+); the primary "
            f"is Redis {version}: upgrade it, or set REDIS_WAIT_AOF=off"
        )
    if settings.redis_wait_aof == "all":
        persistence = await client.info("persistence")
        if not int(persistence.get("aof_enabled", 0)):
            return (
                "REDIS_WAIT_AOF=all waits for the primary's own append-only file, and it has "
                "none (appendonly no): turn it on, or set REDIS_WAIT_AOF=replicas"
            )
    return None


def parse_version(version: str) -> tuple[int, ...]:
    """Its numbers: "6.2.14" -> (6, 2, 14); what is not a number ends it ("7.2.0-rc1" -> (7, 2))."""
    numbers: list[int] = []
    for part in version.split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


def aof_counts(reply: object) -> tuple[int, int]:
    """WAITAOF's [primaries, replicas] (an error reply counts as none)."""
    if isinstance(reply, list | tuple) and len(reply) == 2:
        local, replicas = reply
        if isinstance(local, int) and isinstance(replicas, int):
            return local, replicas
    return 0, 0
