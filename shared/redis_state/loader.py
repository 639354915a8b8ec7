"""Builds each script's source from lua/ and registers it with a redis-py client.

A script runs as one source: the generated definitions of keys.py it uses (the table `K` of
key names, QUEUE_OF, the limits), the helpers of lua/lib.lua it calls (and those they call),
then lua/<name>.lua. Redis scripts cannot load modules, so sharing code means sending it with
each script; EVALSHA sends only the hash, but Redis runs a script's whole top level on every
call, and defining a helper it never calls would cost each call a closure for nothing. So a
script carries only what it uses, in lib.lua's order (each helper follows the ones it calls).
Sources are built once per process.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Any, ClassVar

import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript, Script

from shared.redis_state.keys import lua_prelude

LIBRARY = "lib"
_PACKAGE = "shared.redis_state"
_HELPER = re.compile(r"^local function (\w+)\(", re.MULTILINE)
_CALL = re.compile(r"\b(\w+)\(")


def _read(name: str) -> str:
    return (resources.files(_PACKAGE) / "lua" / f"{name}.lua").read_text(encoding="utf-8")


def script_names() -> tuple[str, ...]:
    """Every script in lua/ (lib.lua is not one: its helpers go into the scripts)."""
    folder = resources.files(_PACKAGE) / "lua"
    names = (entry.name.removesuffix(".lua") for entry in folder.iterdir())
    return tuple(sorted(name for name in names if name != LIBRARY and not name.startswith(".")))


@cache
def helpers() -> dict[str, str]:
    """lib.lua's helpers by name, in its order: each with the comment above it."""
    found = {}
    for block in _read(LIBRARY).split("\n\n"):
        match = _HELPER.search(block)
        if match:
            found[match.group(1)] = block.strip("\n")
    return found


def _used(text: str, library: dict[str, str]) -> set[str]:
    """The helpers `text` calls, and the ones they call in turn."""
    used: set[str] = set()
    pending = set(_CALL.findall(text)) & library.keys()
    while pending:
        name = pending.pop()
        used.add(name)
        pending |= (set(_CALL.findall(library[name])) & library.keys()) - used
    return used


@cache
def source(name: str) -> str:
    """The whole source Redis runs for script `name` (e.g. "task_start")."""
    if name == LIBRARY:
        raise ValueError("lib.lua holds helpers for the scripts; it is not one")
    script, library = _read(name), helpers()
    used = _used(script, library)
    body = "\n\n".join([*(block for helper, block in library.items() if helper in used), script])
    prelude = [line for word, line in lua_prelude().items() if re.search(rf"\b{word}\b", body)]
    generated = "-- Generated from shared/redis_state/keys.py and lua/lib.lua, then lua/"
    return f"{generated}{name}.lua.\n" + "\n".join(prelude) + "\n\n" + body


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
