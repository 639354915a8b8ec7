"""A scripted model server for the worker's backend clients (worker/backends/): a fake
`Transport` (worker/http_client.py) that records each request and answers what a handler
returns, or raises the http_client error the handler raises. No sockets: the real pool has its
own tests."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sent:
    """One request as the transport received it; header names lower-cased."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    read_timeout: float | None
    connect_timeout: float | None = None


@dataclass
class Canned:
    """An answer: status, headers, body; `closed` once the client let go of it."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    closed: bool = False

    def header(self, name: str) -> str | None:
        return {key.lower(): value for key, value in self.headers.items()}.get(name.lower())

    async def read(self) -> bytes:
        return self.body

    async def aclose(self) -> None:
        self.closed = True


def answer(status: int, value: Any, **headers: str) -> Canned:
    """`value` as a JSON body (TorchServe sends no Content-Type for JSON)."""
    return Canned(status, json.dumps(value).encode(), headers)


def error_json(status: int, kind: str, message: str) -> Canned:
    """TorchServe's error body."""
    return answer(status, {"code": status, "type": kind, "message": message})


Handler = Callable[[Sent], Canned]


class FakeUpstream:
    """Records what it is sent in `sent`, every answer it gave in `answers`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.sent: list[Sent] = []
        self.answers: list[Canned] = []
        self.closed = False

    async def request(
        self,
        method: str,
        url: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        read_timeout: float | None = None,
        connect_timeout: float | None = None,
    ) -> Canned:
        lowered = {k.lower(): v for k, v in headers}
        sent = Sent(method, url, lowered, body, read_timeout, connect_timeout)
        self.sent.append(sent)
        canned = self.handler(sent)
        self.answers.append(canned)
        return canned

    async def aclose(self) -> None:
        self.closed = True
