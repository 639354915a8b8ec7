"""Kombu's own functions, as `install()` found them, by the name of the attribute it replaced.

Each replacement calls kombu's original through `original(...)`, so every attribute is wrapped
exactly once and a replacement never calls another of ours by accident.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ORIGINALS: dict[str, Callable[..., Any]] = {}


def original(target: str) -> Callable[..., Any]:
    """Kombu's function behind `target` ("QoS.ack", "Channel._brpop_read", ...)."""
    return ORIGINALS[target]
