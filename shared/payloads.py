"""Payloads that are bytes (images, audio, documents), from the API to TorchServe via the queue.

A payload is one raw body or the file parts of a multipart request, kept as one byte string (the
parts back to back) plus each part's name, filename, content type and size. Small payloads ride
inline in the Celery message; above `CLAIM_CHECK_BYTES` they are stored once in Redis under
`dispatch:payload:<task id>` with the task's TTL (a claim check) and the message carries only the
reference: a 6 MB image is not base64'd twice into the broker's list and then copied into
`unacked` too. Every transition that ends a task deletes the key (shared/redis_state/lua/lib.lua).

The multipart encoding lives here, not in the worker, because the API bounds the body *as
TorchServe will receive it* (MAX_BODY_BYTES) and so must know its exact size before enqueueing.
"""

from __future__ import annotations

import base64
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict
from redis.client import NEVER_DECODE

from shared.redis_state.keys import payload_key

CLAIM_CHECK_BYTES = 64 * 1024
DEFAULT_MEDIA_TYPE = "application/octet-stream"
# Same length for every boundary, so the API can size a body before the worker encodes it.
_BOUNDARY_BYTES = 16


class Part(BaseModel):
    """One file part of a multipart payload, or (name None) the whole raw body."""

    model_config = ConfigDict(frozen=True)

    name: str | None = None
    filename: str | None = None
    content_type: str | None = None
    size: int


class PayloadRef(BaseModel):
    """What the Celery message carries: the parts, and the bytes inline (base64) or a key."""

    model_config = ConfigDict(frozen=True)

    parts: tuple[Part, ...]
    multipart: bool
    inline: str | None = None
    key: str | None = None

    def __repr__(self) -> str:  # never the bytes
        return f"PayloadRef({len(self.parts)} parts, {sum(p.size for p in self.parts)} bytes)"


class Payload:
    """The API's copy of a payload: the bytes (parts back to back) and their parts."""

    def __init__(self, data: bytes | bytearray, parts: list[Part], multipart: bool) -> None:
        self.data = data
        self.parts = parts
        self.multipart = multipart

    @property
    def wire_size(self) -> int:
        """Bytes of the body TorchServe receives (the multipart encoding, or the raw body)."""
        if not self.multipart:
            return len(self.data)
        return multipart_size(self.parts)

    def reference(self, task_id: str) -> tuple[PayloadRef, bytes | bytearray | None]:
        """The message's reference, and the bytes to store under its key (None: inline)."""
        parts = tuple(self.parts)
        if len(self.data) <= CLAIM_CHECK_BYTES:
            inline = base64.b64encode(self.data).decode("ascii")
            return PayloadRef(parts=parts, multipart=self.multipart, inline=inline), None
        ref = PayloadRef(parts=parts, multipart=self.multipart, key=payload_key(task_id))
        return ref, self.data


async def read_payload(client: Any, ref: PayloadRef) -> bytes:
    """The payload's bytes (asyncio redis-py client); PayloadLost when its key is gone."""
    from shared.errors import PayloadLost  # here: shared.errors imports shared.models imports us

    if ref.inline is not None:
        return base64.b64decode(ref.inline)
    assert ref.key is not None
    # NEVER_DECODE: the workers' client decodes replies to str, and these are raw bytes.
    data = await client.execute_command("GET", ref.key, **{NEVER_DECODE: True})
    if data is None:
        raise PayloadLost(
            "the task's payload is no longer in Redis (expired or evicted): submit it again"
        )
    return bytes(data)


# --- multipart/form-data (RFC 7578) -----------------------------------------------------------


def _quoted(value: str) -> str:
    # WHATWG's form encoding: the three characters that would end the quoted string or header.
    return value.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _part_head(part: Part, boundary: str) -> bytes:
    disposition = f'form-data; name="{_quoted(part.name or "data")}"'
    if part.filename is not None:
        disposition += f'; filename="{_quoted(part.filename)}"'
    head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
    if part.content_type:
        head += f"Content-Type: {part.content_type}\r\n"
    return (head + "\r\n").encode("utf-8")


def _boundary() -> str:
    return "dispatcher-" + secrets.token_hex(_BOUNDARY_BYTES)


def multipart_size(parts: list[Part] | tuple[Part, ...]) -> int:
    """Exact length of `encode_multipart` for these parts (every boundary has one length)."""
    boundary = _boundary()
    size = len(f"--{boundary}--\r\n")
    for part in parts:
        size += len(_part_head(part, boundary)) + part.size + 2
    return size


def encode_multipart(
    parts: tuple[Part, ...], data: bytes | bytearray | memoryview
) -> tuple[bytes, str]:
    """The multipart body with the same names, filenames, content types and bytes; its type."""
    boundary = _boundary()
    chunks: list[bytes | memoryview] = []
    view = memoryview(data)
    offset = 0
    for part in parts:
        chunks += [_part_head(part, boundary), view[offset : offset + part.size], b"\r\n"]
        offset += part.size
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"
