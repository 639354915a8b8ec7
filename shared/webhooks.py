"""Webhooks as Standard Webhooks v1 defines them: where they may go, how they are signed, the body.

Used by the API (the allow-list check before anything is enqueued) and by the webhook consumer
(the same check again at send time, the signature and the body). The outbox that carries events
from a task's transition to the consumer is shared/redis_state/outbox_scripts.py; the sender is
worker/webhooks.py.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import SplitResult, urlsplit

from pydantic import BaseModel, Field

from shared.redis_state.batch import decode_batch
from shared.redis_state.record import as_mapping, decode_record

SECRET_PREFIX = "whsec_"  # noqa: S105  # the format's prefix, not a secret


@dataclass(frozen=True)
class OriginRule:
    """One WEBHOOK_ALLOWED_ORIGINS entry: `scheme://host:port`, the host may be `*` or `*.domain`.

    An exact entry is trusted wherever it resolves (an operator listed it: a receiver on a private
    network is fine). A wildcard entry only admits hosts that resolve to public addresses, checked
    on submission and again at send time, so DNS cannot be rebound into a private network.
    """

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, entry: str) -> OriginRule:
        parts = urlsplit(entry.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"WEBHOOK_ALLOWED_ORIGINS: {entry!r} is not an http(s) origin")
        if parts.path not in ("", "/") or parts.query or parts.username or parts.password:
            raise ValueError(
                f"WEBHOOK_ALLOWED_ORIGINS: {entry!r} must be an origin only, scheme://host[:port]"
            )
        host = parts.hostname.lower()
        if "*" in host and not (host == "*" or (host.startswith("*.") and "*" not in host[1:])):
            raise ValueError(
                f"WEBHOOK_ALLOWED_ORIGINS: {entry!r}: a wildcard is `*` or `*.domain` only"
            )
        return cls(parts.scheme, host, parts.port or (443 if parts.scheme == "https" else 80))

    @property
    def exact(self) -> bool:
        return "*" not in self.host

    def matches(self, url: SplitResult) -> bool:
        host = (url.hostname or "").lower()
        if url.scheme != self.scheme or _port(url) != self.port:
            return False
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def _port(url: SplitResult) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


@dataclass(frozen=True)
class WebhookTarget:
    """A webhook URL that passed the allow-list; `exact`: its origin is listed as it is."""

    url: str
    parts: SplitResult
    exact: bool

    @property
    def origin(self) -> str:
        return f"{self.parts.scheme}://{self.parts.hostname}:{_port(self.parts)}"


class TargetRefused(ValueError):
    """A webhook URL the allow-list refuses; the message says why, without the URL's path."""


def match_target(url: str, origins: Iterable[str]) -> WebhookTarget:
    """The URL's target if an allowed origin admits it; TargetRefused otherwise."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # a bad port raises only when read
    except ValueError:
        raise TargetRefused("webhook: not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused("webhook: must be an http(s) URL with a host")
    if parts.username or parts.password:
        raise TargetRefused("webhook: must not carry credentials (user:password@)")
    rules = [OriginRule.parse(entry) for entry in origins]
    if not rules:
        raise TargetRefused("webhooks are off here: WEBHOOK_ALLOWED_ORIGINS is empty")
    matched = [rule for rule in rules if rule.matches(parts)]
    if not matched:
        raise TargetRefused(
            f"webhook: {parts.scheme}://{parts.hostname}:{_port(parts)} is not in "
            "WEBHOOK_ALLOWED_ORIGINS"
        )
    target = WebhookTarget(url, parts, exact=any(rule.exact for rule in matched))
    if not target.exact and literal_address(parts.hostname) is not None:
        check_addresses(target, [parts.hostname])
    return target


def literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_addresses(target: WebhookTarget, addresses: Iterable[str]) -> None:
    """A wildcard-admitted target must resolve to public addresses only (no private network)."""
    if target.exact:
        return
    if not all(is_public(address) for address in addresses):
        raise TargetRefused(
            f"webhook: {target.parts.hostname} resolves to a private or local address; only "
            "origins listed exactly in WEBHOOK_ALLOWED_ORIGINS may"
        )


# --- signing ------------------------------------------------------------------------------------


def secret_bytes(secret: str) -> bytes:
    """The key of a `whsec_<base64>` secret; ValueError naming the format otherwise."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("WEBHOOK_SECRET: each secret is whsec_<base64 of 24-64 random bytes>")
    encoded = secret[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError("WEBHOOK_SECRET: the part after whsec_ is not base64") from None
    if len(key) < 16:
        raise ValueError("WEBHOOK_SECRET: the key is shorter than 16 bytes")
    return key


def signature(keys: Iterable[bytes], webhook_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<sig> v1,<sig>`: one signature per key, so receivers with either secret verify."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys
    )


def event_body(event: Mapping[str, str]) -> bytes:
    """`{"type", "timestamp", "data"}` of an outbox event; data is the task view at the event."""
    fields = as_mapping(json.loads(event["record"]))
    # `batch.completed` carries the batch as GET /batches/{id} shows it.
    batch = event["type"].startswith("batch.")
    view = (decode_batch if batch else decode_record)(event["task_id"], fields)
    at = datetime.fromtimestamp(float(event["at"]), UTC)
    body = {
        "type": event["type"],
        "timestamp": at.isoformat().replace("+00:00", "Z"),
        "data": view.model_dump(mode="json"),
    }
    return json.dumps(body, separators=(",", ":")).encode()


# --- the delivery log (GET /tasks/{id}/deliveries) ---------------------------------------------


class DeliveryAttempt(BaseModel):
    """One attempt to deliver one event, as the consumer logged it."""

    event: str = Field(description="The event type, e.g. task.succeeded.")
    webhook_id: str = Field(description="The `webhook-id` header: the same on every retry.")
    attempt: int
    at: datetime
    status: int | None = Field(None, description="The receiver's HTTP status, if it answered.")
    error: str | None = Field(None, description="Why there was no usable answer.")
    duration_ms: float
    response: str | None = Field(None, description="The start of the receiver's answer.")
    outcome: str = Field(description="delivered, retrying, stopped (410), failed (given up).")


class Deliveries(BaseModel):
    """Every attempt for a task's webhook events, oldest first."""

    task_id: str
    webhook_id: str | None = Field(None, description="The latest event's id.")
    state: str | None = Field(
        None, description="The latest event: pending, queued, sending, delivered, stopped, failed."
    )
    attempts: list[DeliveryAttempt]


def attempt_json(**fields: Any) -> str:
    return DeliveryAttempt.model_validate(fields).model_dump_json()
