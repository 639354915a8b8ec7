"""A Redis that answers but refuses writes: the worker waits it out instead of crashing or losing.

Symptom. Out of memory under `noeviction`, or a read-only replica after a failover: reads work,
every write gets an error reply (`OOM ...`, `READONLY ...`; inside a MULTI even ZREM and HDEL are
refused under OOM). Without these patches:

- an ack (`ZREM`+`HDEL` in MULTI) raises out of the hub and the worker exits with
  "Unrecoverable error: OutOfMemoryError" (tests/reliability/test_redis_refuses_writes.py);
- a message that BRPOP already popped is lost when writing it to the unacked set is refused
  (`QoS.append` raises before the message is held anywhere);
- BRPOP on a read-only replica raises READONLY out of the hub, as does the unacked sweep; a
  BRPOP blocked while its server becomes a replica gets `UNBLOCKED ...` (Redis >= 6.2) instead.

Cause. Unlike a lost connection, kombu 5.7's Redis transport treats these replies as channel
errors (`ResponseError` is not among its connection errors), and nothing on the worker's event
loop catches them, so Celery calls them unrecoverable.

Upstream. The OOM crash and hang are celery#5716 (https://github.com/celery/celery/issues/5716);
READONLY after a failover ending the worker is celery#7946 and, behind Sentinel, celery#6348
(https://github.com/celery/celery/issues/7946, https://github.com/celery/celery/issues/6348).

The fix, as close to kombu's own code as possible: BRPOP pauses, `append` retries until the
message is safely in the unacked set (the consumer stops fetching meanwhile), and a refused ack,
reject or restore leaves the message in the unacked set, from where the visibility-timeout sweep
brings it back once writes are accepted (START then skips a task that already ended). The task's
own record writes wait in `retry_while_refused` (worker/store.py).

Remove when kombu waits out (or reconnects on) OOM and READONLY replies on the event loop and
holds a popped message until `append` succeeds: run tests/reliability/test_redis_refuses_writes.py
against the new kombu with these wrappers left out of `install()`; both of its conditions must
still end with every task finished and no worker exited.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from queue import Empty
from typing import Any, TypeVar

from celery.worker import state as worker_state
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from redis.exceptions import ResponseError

from shared.errors import REDIS_WRITE_REFUSALS, redis_write_refusal
from worker.kombu_patches.originals import original

log = logging.getLogger(__name__)

T = TypeVar("T")

# The reply to a BRPOP that was blocked when its server turned into a replica.
UNBLOCKED = "UNBLOCKED"
# Backoff between attempts while writes are refused: soon after Redis recovers, without a hot loop.
FIRST_PAUSE = 0.1
MAX_PAUSE = 1.0


def _stopping() -> bool:
    # Celery's signal handlers set these (to an exit code, which may be 0) on warm/cold shutdown.
    return any(flag is not None and flag is not False for flag in _shutdown_flags())


def _shutdown_flags() -> tuple[object, object]:
    return worker_state.should_stop, worker_state.should_terminate


def refusal_of(error: BaseException) -> str | None:
    return redis_write_refusal(error) if isinstance(error, ResponseError) else None


class _Refused:
    """The wait of one write while Redis refuses it: the backoff, and one line each way."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.pause = FIRST_PAUSE
        self.since: float | None = None

    def refused(self, error: ResponseError) -> float:
        """The pause before the next attempt; raises `error` when it is no refusal or the worker
        is stopping."""
        reason = refusal_of(error)
        if reason is None or _stopping():
            raise error
        if self.since is None:
            self.since = time.monotonic()
            log.warning("Redis refuses writes: %s; %s waits for it", reason, self.what)
        pause, self.pause = self.pause, min(self.pause * 2, MAX_PAUSE)
        return pause

    def accepted(self) -> None:
        if self.since is not None:
            waited = time.monotonic() - self.since
            log.warning("Redis accepts writes again: %s done after %.1fs", self.what, waited)


def retry_while_refused(write: Callable[[], T], what: str) -> T:
    """`write()`, repeated with backoff while Redis refuses writes, until accepted.

    Gives up (raises the refusal) only when the worker shuts down: the message of the task is
    still unacknowledged then, so it is delivered again later.
    """
    waiting = _Refused(what)
    while True:
        try:
            result = write()
        except ResponseError as error:
            time.sleep(waiting.refused(error))
            continue
        waiting.accepted()
        return result


async def retry_while_refused_async(write: Callable[[], Awaitable[T]], what: str) -> T:
    """`retry_while_refused` on an event loop: the other calls go on while this one waits."""
    waiting = _Refused(what)
    while True:
        try:
            result = await write()
        except ResponseError as error:
            await asyncio.sleep(waiting.refused(error))
            continue
        waiting.accepted()
        return result


def append(self: kombu_redis.QoS, message: Any, delivery_tag: str) -> None:
    """`QoS.append`: BRPOP has already removed the message from the queue; until it is in the
    unacked set this process holds the only copy, so wait here (the consumer fetches nothing
    meanwhile)."""
    task_id = message.headers.get("id", "?") if isinstance(message.headers, dict) else "?"
    retry_while_refused(
        lambda: original("QoS.append")(self, message, delivery_tag),
        f"holding the message of task {task_id}",
    )


def leave_unacked(self: kombu_redis.QoS, tag: str, what: str, error: ResponseError) -> None:
    """A refused ack or reject (worker/kombu_patches/acks.py): the message stays in the unacked
    set; any other error reply is raised as it was."""
    reason = refusal_of(error)
    if reason is None:
        raise error
    log.warning(
        "message %s not %s: Redis refuses writes: %s; it stays unacknowledged and comes back "
        "after the visibility timeout, where START skips a task that already ended",
        tag,
        what,
        reason,
    )
    # Forget it here only, so the prefetch credit is returned.
    virtual.QoS.ack(self, tag)  # type: ignore[no-untyped-call]


def restore_visible(self: kombu_redis.QoS, *args: Any, **kwargs: Any) -> None:
    """`QoS.restore_visible` (the visibility-timeout sweep): a refused sweep is tried again at
    its next interval."""
    try:
        original("QoS.restore_visible")(self, *args, **kwargs)
    except ResponseError as error:
        reason = refusal_of(error)
        if reason is None:
            raise
        _warn_now_and_then(
            "restore", "unacked messages not restored now: Redis refuses writes: %s", reason
        )


def restore_unacked(self: kombu_redis.QoS, client: Any = None) -> None:
    """`QoS.restore_unacked` (a channel closing): held messages that cannot be put back now stay
    in the unacked set.

    That includes a channel closed after its transport let go of the connection (kombu sets
    `Transport.client` to None; Celery then closes the channel once more while handling the lost
    broker connection). kombu would build a new pool from the missing connection details and
    raise AttributeError, which Celery calls unrecoverable: the worker exits with every task it
    held. Seen in tests/reliability/test_redis_outage.py about one run in seven.
    """
    if client is None and self.channel.connection.client is None:
        log.warning("held messages left unacked: their broker connection is already closed")
        return
    try:
        original("QoS.restore_unacked")(self, client)
    except ResponseError as error:
        reason = refusal_of(error)
        if reason is None:
            raise
        # They stay in the unacked set: any worker's sweep restores them once writes work.
        log.warning("held messages left unacked: Redis refuses writes: %s", reason)
        self._delivered.clear()


# Event-loop paths that repeat every second or so while writes are refused warn once a minute.
WARN_EVERY = 60.0
_warned_at: dict[str, float] = {}


def _warn_now_and_then(key: str, message: str, *args: Any) -> None:
    now = time.monotonic()
    if now - _warned_at.get(key, -WARN_EVERY) >= WARN_EVERY:
        _warned_at[key] = now
        log.warning(message, *args)


def brpop_read(self: kombu_redis.Channel, **options: Any) -> Any:
    """`Channel._brpop_read`: BRPOP is a write (READONLY on a replica); pause before the hub sends
    the next one and report an empty poll."""
    try:
        return original("Channel._brpop_read")(self, **options)
    except ResponseError as error:
        reason = refusal_of(error)
        if reason is None and str(error).startswith(UNBLOCKED):
            # The BRPOP in flight when the server became a replica: its next one is READONLY.
            # Redis closes such a client after this reply; reconnecting here keeps that from
            # reaching Celery as a connection loss, whose consumer restart would then fail on
            # the read-only server and end the worker.
            reason = REDIS_WRITE_REFUSALS["READONLY"]
            self.client.connection.disconnect()
        if reason is None:
            raise
        _warn_now_and_then("brpop", "not fetching tasks: Redis refuses writes: %s", reason)
        time.sleep(MAX_PAUSE)
        raise Empty() from error
