"""The webhook consumer: the relay from the outbox to the `webhooks` queue, and the delivery task.

The relay (a thread in each consumer's main process) moves due events from the outbox's sorted
set onto the queue every RELAY_SECONDS; `webhooks.deliver` claims one, sends it once and records
the outcome: delivered (2xx in time), stopped (410, or the allow-list now refuses it), failed
(WEBHOOK_MAX_ATTEMPTS used), or due again after the next delay of WEBHOOK_RETRY_SCHEDULE
(jittered) or the receiver's Retry-After on 429/503. See shared/redis_state/outbox_scripts.py for
why nothing is lost
when a consumer dies and why a duplicate message is not a duplicate send. Nothing here reads or
writes the task's own state: a webhook never changes a task.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from functools import cache
from typing import Any, cast

import redis
from celery.signals import worker_ready, worker_shutdown
from prometheus_client import Counter, start_http_server

from shared.redis_connect import sync_client
from shared.redis_state.keys import MIN_EVENT_TTL, event_key
from shared.redis_state.outbox_scripts import ClaimEvent, DeferEvent, PromoteEvents, RecordOutcome
from shared.settings import Settings, get_settings
from shared.webhooks import attempt_json
from worker.webhook_app import TASK_DELIVER, WEBHOOK_QUEUE, app
from worker.webhook_sender import SendResult, WebhookSender

log = logging.getLogger(__name__)

RELAY_SECONDS = 0.2
RELAY_BATCH = 200
# A promoted event whose message was lost (a consumer died holding it prefetched) comes due again
# after this; a duplicate message meanwhile is skipped by its ticket.
QUEUE_LEASE = 300.0
# Sends in flight per receiver origin in one consumer: a dead receiver holds at most this many
# threads, the others keep serving other receivers. An event over it waits DEFER_SECONDS.
PER_ORIGIN_SENDS = 4
DEFER_SECONDS = 1.0
JITTER = 0.2

DELIVERIES = Counter(
    "dispatcher_webhook_deliveries",
    "Webhook delivery attempts by event type and outcome (delivered, retrying, stopped, failed).",
    ["event", "outcome"],
)


class Outbox:
    """The consumer's side of the outbox (shared/redis_state/outbox_scripts.py; sync redis-py)."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        # shared/redis_connect.py: on Sentinel it follows the primary like every other client.
        self.redis = client or sync_client(
            settings, decode_responses=True, socket_timeout=10, socket_connect_timeout=5
        )
        self._promote = PromoteEvents(self.redis)
        self._claim = ClaimEvent(self.redis)
        self._outcome = RecordOutcome(self.redis)
        self._defer = DeferEvent(self.redis)
        self.sender = WebhookSender(settings)
        self._in_flight: defaultdict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    @property
    def send_lease(self) -> float:
        """How long a claimed send may take before its event is due again (its consumer died)."""
        return 2 * self.settings.webhook_timeout + 5

    def promote(self) -> list[tuple[str, str]]:
        return self._promote(now=time.time(), lease=QUEUE_LEASE, limit=RELAY_BATCH)

    def deliver(self, event_id: str, ticket: str) -> None:
        url = cast(str | None, self.redis.hget(event_key(event_id), "url"))
        if url is None:
            return
        origin = url.split("/", 3)[2] if url.count("/") >= 2 else url
        if not self._enter(origin):
            self._defer(event_id, ticket, due=time.time() + DEFER_SECONDS)
            return
        try:
            self._deliver(event_id, ticket)
        finally:
            self._leave(origin)

    def _deliver(self, event_id: str, ticket: str) -> None:
        event = self._claim(event_id, ticket, now=time.time(), lease=self.send_lease)
        if not event:
            return  # a duplicate message, or the event was sent meanwhile
        at = time.time()
        result = self.sender.send(event_id, event)
        state, due, outcome = self._decide(result, int(event["round"]))
        entry = attempt_json(
            event=event["type"],
            webhook_id=event_id,
            attempt=int(event["attempts"]),
            at=datetime.fromtimestamp(at, UTC),
            status=result.status,
            error=result.error,
            duration_ms=result.duration_ms,
            response=result.response,
            outcome=outcome,
        )
        ttl = max(self.settings.result_ttl, MIN_EVENT_TTL)
        self._outcome(
            event_id, event["ticket"], event["task_id"], attempt=entry, state=state, due=due,
            log_ttl=ttl,
        )  # fmt: skip
        DELIVERIES.labels(event["type"], outcome).inc()
        # The origin only: a webhook URL's path and query may carry the receiver's secrets.
        origin = event["url"].split("/", 3)[2] if event["url"].count("/") >= 2 else "?"
        log.info(
            "webhook %s %s to %s: %s (%s)",
            event_id,
            event["type"],
            origin,
            outcome,
            result.status if result.status is not None else result.error,
        )

    def _decide(self, result: SendResult, round_attempts: int) -> tuple[str, float, str]:
        """(next state, due time if retried, outcome label)."""
        if result.delivered and result.error is None:
            return "delivered", 0.0, "delivered"
        if result.refused or result.status == 410:
            return "stopped", 0.0, "stopped"
        if round_attempts >= self.settings.webhook_max_attempts:
            return "failed", 0.0, "failed"
        schedule = self.settings.webhook_retry_schedule
        longest = max(schedule)
        if result.status in (429, 503) and result.retry_after is not None:
            delay = min(result.retry_after, longest)
        else:
            delay = schedule[min(round_attempts - 1, len(schedule) - 1)]
            delay *= 1 + random.uniform(-JITTER, JITTER)  # noqa: S311  # jitter, not crypto
        return "pending", time.time() + delay, "retrying"

    def _enter(self, origin: str) -> bool:
        with self._lock:
            if self._in_flight[origin] >= PER_ORIGIN_SENDS:
                return False
            self._in_flight[origin] += 1
            return True

    def _leave(self, origin: str) -> None:
        with self._lock:
            self._in_flight[origin] -= 1
            if not self._in_flight[origin]:
                del self._in_flight[origin]


@cache
def _outbox() -> Outbox:
    return Outbox(get_settings())


@app.task(name=TASK_DELIVER)  # type: ignore[untyped-decorator]
def deliver(event_id: str, ticket: str) -> None:
    """Send one outbox event once (see the module docstring)."""
    _outbox().deliver(event_id, ticket)


# --- the relay (main process) -----------------------------------------------------------------

_stop = threading.Event()


def _relay() -> None:
    box = _outbox()
    while not _stop.wait(RELAY_SECONDS):
        try:
            for event_id, ticket in box.promote():
                deliver.apply_async((event_id, ticket), queue=WEBHOOK_QUEUE)
        except redis.RedisError as error:  # the events stay due: promoted on a later round
            log.warning("webhook relay: %s", type(error).__name__)
        except Exception:
            log.exception("webhook relay failed; retrying")


@worker_ready.connect  # type: ignore[untyped-decorator]
def start_relay(sender: Any = None, **_: Any) -> None:
    settings = get_settings()
    if settings.webhook_metrics_port:
        start_http_server(settings.webhook_metrics_port, settings.worker_metrics_host)
    threading.Thread(target=_relay, name="webhook-relay", daemon=True).start()


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def stop_relay(**_: Any) -> None:
    _stop.set()
