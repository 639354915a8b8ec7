"""`Idempotency-Key` on `POST /dispatch_model` (draft-ietf-httpapi-idempotency-key-header).

A client that lost its connection (or whose sync wait ended) retries with the same key and gets
the same task, never a second TorchServe call. The key is scoped to the caller's API key (its
owner name) and kept IDEMPOTENCY_TTL. Stored under it: a fingerprint of the request and the task
id (shared/redis_state/record.py), written by the same Redis script that writes the task and its
message (task_submit), so concurrent first requests with one key create exactly one task and
the others attach to it. A request refused before that script (422, 403, 413) or by it (429)
stores nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from dataclasses import dataclass

from shared.backends import Target
from shared.errors import IdempotencyKeyReused, InvalidIdempotencyKey
from shared.models import PredictionRequest
from shared.payloads import Payload
from shared.redis_state.keys import idempotency_key
from shared.redis_state.record import idempotency_record, parse_idempotency_record

HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 255
# RFC 8941 sf-string: printable ASCII in quotes, `"` and `\` escaped with a backslash.
_SF_STRING = re.compile(r'^"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"$')
# A bare value (what most clients send, e.g. a UUID): printable ASCII without spaces or quotes.
_BARE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")
# Both forms as one pattern, for the OpenAPI document (api/openapi.py): the same characters, and
# 1-MAX_KEY_CHARS of them once unquoted. `$(?!\n)`: the end in both ECMA and Python regexes.
KEY_PATTERN = (
    rf'^(?:"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\]){{1,{MAX_KEY_CHARS}}}"'
    rf"|[\x21\x23-\x5b\x5d-\x7e]{{1,{MAX_KEY_CHARS}}})$(?!\n)"
)
# Payloads above this are hashed off the event loop (a 6 MB sha256 is a few ms of CPU).
_HASH_INLINE_BYTES = 256 * 1024


class Replay(Exception):  # not an error: the route answers with the held task
    """task_submit found a live task under the key, for the same request: answer with that task."""

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id


@dataclass(frozen=True)
class IdempotencyClaim:
    """What task_submit needs: the Redis key, and the fingerprint to store or compare."""

    redis_key: str
    fingerprint: str

    def record(self, task_id: str) -> str:
        return idempotency_record(self.fingerprint, task_id)

    def held_task(self, held: str) -> str:
        """The task held under the key; 422 when it was created by a different request."""
        fingerprint, task_id = parse_idempotency_record(held)
        if fingerprint != self.fingerprint:
            raise IdempotencyKeyReused(
                f"this {HEADER} was used for a different request (model, version, target, "
                "timeout, payload or webhook settings differ); use a new key for a new request"
            )
        return task_id


def parse_key(values: list[str]) -> str | None:
    """The key from the header's values (None: no header); 400 naming the header otherwise."""
    if not values:
        return None
    if len(values) > 1:
        raise InvalidIdempotencyKey(f"{HEADER}: send the header once")
    raw = values[0].strip()
    quoted = _SF_STRING.match(raw)
    if quoted:
        key = re.sub(r"\\(.)", r"\1", quoted.group(1))
    elif _BARE.match(raw):
        key = raw
    else:
        key = ""
    if not 1 <= len(key) <= MAX_KEY_CHARS:
        raise InvalidIdempotencyKey(
            f'{HEADER}: must be a string ("abc", RFC 8941) or a token of 1-{MAX_KEY_CHARS} '
            "printable ASCII characters, e.g. a UUID"
        )
    return key


async def claim(
    key: str, owner: str, request: PredictionRequest, target: Target, payload: Payload | None
) -> IdempotencyClaim:
    """The key's Redis name (per owner) and the request's fingerprint."""
    scoped = hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()
    if payload is not None and len(payload.data) > _HASH_INLINE_BYTES:
        fingerprint = await asyncio.to_thread(fingerprint_of, request, target, payload)
    else:
        fingerprint = fingerprint_of(request, target, payload)
    return IdempotencyClaim(idempotency_key(scoped), fingerprint)


def fingerprint_of(request: PredictionRequest, target: Target, payload: Payload | None) -> str:
    """sha256 over what decides the task's outcome and its webhooks (never the credentials).

    The payload's bytes and parts, or the JSON body TorchServe would receive (keys sorted: the
    same object in another order is the same request).
    """
    head = {
        "model_name": request.model_name,
        "model_version": request.model_version,
        "origin": target.origin,
        "backend": target.backend,
        "operation": target.operation,
        "timeout": request.timeout,
        "webhook": request.webhook,
        "webhook_events": request.webhook_event_types() if request.webhook else None,
        "body": request.backend_body(target) if payload is None else None,
        "parts": [p.model_dump() for p in payload.parts] if payload is not None else None,
        "multipart": payload.multipart if payload is not None else None,
    }
    if request.stream:  # only when asked, so fingerprints kept from before streams still match
        head["stream"] = True
    digest = hashlib.sha256(json.dumps(head, sort_keys=True, separators=(",", ":")).encode())
    if payload is not None:
        digest.update(b"\0")
        digest.update(payload.data)
    return digest.hexdigest()
