"""One signed HTTP POST of one webhook event, checked against the allow-list at send time.

The URL is matched against this process's WEBHOOK_ALLOWED_ORIGINS again (the list may have
changed since the task was submitted). A wildcard-admitted host is resolved here, its addresses
must all be public, and the connection goes to the address that was checked (SNI and Host keep
the name), so DNS cannot be rebound to a private address between the check and the connect.
Redirects are never followed. Only a short snippet of the answer is read and kept. The body is
the task view of the event's record snapshot, or for a `task.output` the outputs its claim read
from the task's stream (shared/webhook_output.py).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from shared.settings import Settings
from shared.webhook_output import OUTPUT_EVENT, output_body
from shared.webhooks import (
    TargetRefused,
    WebhookTarget,
    check_addresses,
    event_body,
    match_target,
    secret_bytes,
    signature,
)

SNIPPET_BYTES = 200
USER_AGENT = "model-dispatcher-webhooks/1"


@dataclass(frozen=True)
class SendResult:
    """What one attempt gave: an HTTP status, or an error; `refused`: the allow-list said no."""

    duration_ms: float
    status: int | None = None
    error: str | None = None
    response: str | None = None
    retry_after: float | None = None
    refused: bool = False

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class WebhookSender:
    """Signs and sends events; one per consumer process (its connection pool is shared)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._keys = [secret_bytes(s.get_secret_value()) for s in settings.webhook_secret]
        self._client = httpx.Client(
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(settings.webhook_timeout),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
        )

    def send(self, webhook_id: str, event: Mapping[str, str]) -> SendResult:
        started = time.monotonic()

        def elapsed() -> float:
            return round((time.monotonic() - started) * 1000, 1)

        try:
            target = match_target(event["url"], self._settings.webhook_allowed_origins)
        except TargetRefused as refused:
            return SendResult(elapsed(), error=str(refused), refused=True)
        try:
            url, headers, extensions = self._route(target)
        except (TargetRefused, OSError) as unusable:  # rebound, or no longer resolves: retried
            return SendResult(elapsed(), error=str(unusable) or type(unusable).__name__)
        # task.output carries outputs read from the task's stream, not a snapshot of its record.
        body = output_body(event) if event["type"] == OUTPUT_EVENT else event_body(event)
        timestamp = int(time.time())
        headers |= {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(self._keys, webhook_id, timestamp, body),
        }
        try:
            with self._client.stream(
                "POST", url, content=body, headers=headers, extensions=extensions
            ) as response:
                snippet = _snippet(response)
        except httpx.TimeoutException:
            return SendResult(elapsed(), error=f"no answer within {self._timeout:g} s")
        except httpx.HTTPError as failed:
            return SendResult(elapsed(), error=f"{type(failed).__name__}: connection failed")
        duration = elapsed()
        if duration > self._timeout * 1000 and 200 <= response.status_code < 300:
            # Answered, but too late to count (a receiver that trickles its headers).
            return SendResult(duration, response.status_code, "answered after the timeout")
        return SendResult(
            duration,
            response.status_code,
            response=snippet,
            retry_after=_retry_after(response.headers.get("retry-after")),
        )

    @property
    def _timeout(self) -> float:
        return self._settings.webhook_timeout

    def _route(self, target: WebhookTarget) -> tuple[str, dict[str, str], dict[str, Any]]:
        """The URL to connect to, extra headers and httpx extensions (pinned when checked)."""
        if target.exact:
            return target.url, {}, {}
        host = target.parts.hostname or ""
        port = target.parts.port or (443 if target.parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [str(info[4][0]) for info in infos]
        check_addresses(target, addresses)
        pinned = addresses[0]
        literal = f"[{pinned}]" if ":" in pinned else pinned
        url = target.parts._replace(netloc=f"{literal}:{port}").geturl()
        return url, {"host": target.parts.netloc}, {"sni_hostname": host}

    def close(self) -> None:
        self._client.close()


def _snippet(response: httpx.Response) -> str | None:
    data = b""
    for chunk in response.iter_raw():
        data += chunk
        if len(data) >= SNIPPET_BYTES:
            break
    text = data[:SNIPPET_BYTES].decode("utf-8", "replace").strip()
    return text or None


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
