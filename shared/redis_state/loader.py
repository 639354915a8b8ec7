"""Builds each script's source from lua/ and registers it with a redis-py client.

A script runs as one source: the prelude generated from keys.py (the table `K` of key names,
QUEUE_OF and the limits), lua/lib.lua (the shared helpers), then lua/<name>.lua. Redis scripts
cannot load modules, so sharing code means sending it with each script; EVALSHA sends only the
hash, so the size costs nothing per call. Sources are built once per process.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any, ClassVar

import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript, Script

from shared.redis_state.keys import lua_prelude

LIBRARY = "lib"
_PACKAGE = "shared.redis_state"


def _read(name: str) -> str:
    return (resources.files(_PACKAGE) / "lua" / f"{name}.lua").read_text(encoding="utf-8")


def script_names() -> tuple[str, ...]:
    """Every script in lua/ (lib.lua is not one: it is part of each)."""
    folder = resources.files(_PACKAGE) / "lua"
    names = (entry.name.removesuffix(".lua") for entry in folder.iterdir())
    return tuple(sorted(name for name in names if name != LIBRARY and not name.startswith(".")))


@cache
def source(name: str) -> str:
    """The whole source Redis runs for script `name` (e.g. "task_start")."""
    if name == LIBRARY:
        raise ValueError("lib.lua is prepended to every script, not run on its own")
    return f"{lua_prelude()}\n{_read(LIBRARY)}\n{_read(name)}"


def text(reply: Any) -> str:
    """A script's string reply, from a client that decodes replies or one that does not."""
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def register(client: redis.Redis, name: str) -> Script:
    """Script `name` for a sync client (the workers)."""
    return client.register_script(source(name))


def register_async(client: aioredis.Redis, name: str) -> AsyncScript:
    """Script `name` for an asyncio client (the API)."""
    return client.register_script(source(name))


class SyncWrapper:
    """Base of the typed calls of one script on a sync client: `name` says which."""

    name: ClassVar[str]

    def __init__(self, client: redis.Redis) -> None:
        self._script = register(client, self.name)


class AsyncWrapper:
    """Base of the typed calls of one script on an asyncio client: `name` says which."""

    name: ClassVar[str]

    def __init__(self, client: aioredis.Redis) -> None:
        self._script = register_async(client, self.name)
