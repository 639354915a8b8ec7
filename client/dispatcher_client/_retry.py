"""When to retry, and how long to wait first.

Only answers that prove nothing ran (or that the task is kept and a retry re-attaches to it) are
retried, and every POST carries the call's one Idempotency-Key, so a retry can never start a
second prediction. Attempts and total time are both bounded: a client that retries forever only
deepens the overload it is waiting out.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

import httpx

# 503 with a task id is normally the task's own failure (a retry under the same key would only
# replay it); this one says the task is kept and Redis went away mid-wait: retrying re-attaches.
_REATTACH_CODES = frozenset({"queue_unavailable"})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of 429, 503 and connection failures.

    `max_attempts` counts the first try; `max_elapsed` (seconds) bounds the time from the first
    try to the start of the last one, sleeps included. A `Retry-After` that would overrun it ends
    the retries at once instead of sleeping in vain. Without `Retry-After` the delay is
    exponential from `backoff_initial` to `backoff_max`, with jitter so a crowd of clients does
    not come back in step.
    """

    max_attempts: int = 5
    max_elapsed: float = 60.0
    backoff_initial: float = 0.5
    backoff_max: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_elapsed < 0 or self.backoff_initial < 0 or self.backoff_max < 0:
            raise ValueError("max_elapsed, backoff_initial and backoff_max must not be negative")

    def backoff(self, attempt: int) -> float:
        """The delay after failed attempt `attempt` (1-based) when the server named none."""
        ceiling = min(self.backoff_max, self.backoff_initial * 2.0 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311  (jitter, not secrets)


NO_RETRIES = RetryPolicy(max_attempts=1)


def retry_after(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds: delay-seconds (fractions accepted) or an HTTP-date."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def _error_body(response: httpx.Response) -> dict[str, object] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def should_retry(response: httpx.Response) -> bool:
    """429 always (refused before anything was stored); 503 unless it is a task's own outcome."""
    if response.status_code == 429:
        return True
    if response.status_code != 503:
        return False
    body = _error_body(response)
    if body is None or not body.get("task_id"):
        return True  # refused before a task existed (or a proxy's 503): nothing ran
    return body.get("code") in _REATTACH_CODES


def retryable_transport_error(error: httpx.TransportError) -> bool:
    """Network failures and timeouts; not a bad URL or an unsupported scheme."""
    return isinstance(
        error, httpx.NetworkError | httpx.TimeoutException | httpx.RemoteProtocolError
    )
