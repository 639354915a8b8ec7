"""A Redis that answers but refuses writes: the worker waits it out instead of crashing or losing.

Out of memory under `noeviction`, or a read-only replica after a failover: reads work, every write
gets an error reply (`OOM ...`, `READONLY ...`; inside a MULTI even ZREM and HDEL are refused
under OOM). Unlike a lost connection, kombu 5.7's Redis transport treats these replies as
channel errors that nothing catches on the worker's event loop, so without this module:

- an ack (`ZREM`+`HDEL` in MULTI) raises out of the hub and the worker exits with
  "Unrecoverable error: OutOfMemoryError" (seen in tests/test_reliability_redis_refuses_writes.py);
- a message that BRPOP already popped is lost when writing it to the unacked set is refused
  (`QoS.append` raises before the message is held anywhere);
- BRPOP on a read-only replica raises READONLY out of the hub, as does the unacked sweep.

`install()` makes each of these wait or defer, as close to kombu's own code as possible:
BRPOP pauses, `append` retries until the message is safely in the unacked set (the consumer
stops fetching meanwhile), and a refused ack, reject or restore leaves the message in the unacked
set, from where the visibility-timeout sweep brings it back once writes are accepted (START then
skips a task that already ended). The task's own record writes wait in `retry_while_refused`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from queue import Empty
from typing import Any, TypeVar

from celery.worker import state as worker_state
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from redis.exceptions import ResponseError

from shared.errors import redis_write_refusal

log = logging.getLogger(__name__)

T = TypeVar("T")

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


def retry_while_refused(write: Callable[[], T], what: str) -> T:
    """`write()`, repeated with backoff while Redis refuses writes, until accepted.

    Gives up (raises the refusal) only when the worker shuts down: the message of the task is
    still unacknowledged then, so it is delivered again later.
    """
    pause = FIRST_PAUSE
    refused_at: float | None = None
    while True:
        try:
            result = write()
        except ResponseError as error:
            reason = refusal_of(error)
            if reason is None or _stopping():
                raise
            if refused_at is None:
                refused_at = time.monotonic()
                log.warning("Redis refuses writes: %s; %s waits for it", reason, what)
            time.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE)
            continue
        if refused_at is not None:
            waited = time.monotonic() - refused_at
            log.warning("Redis accepts writes again: %s done after %.1fs", what, waited)
        return result


def _append(self: kombu_redis.QoS, message: Any, delivery_tag: str) -> None:
    # BRPOP has already removed the message from the queue: until it is in the unacked set this
    # process holds the only copy, so wait here (the consumer fetches nothing meanwhile).
    task_id = message.headers.get("id", "?") if isinstance(message.headers, dict) else "?"
    retry_while_refused(
        lambda: _original["append"](self, message, delivery_tag),
        f"holding the message of task {task_id}",
    )


def _ack(self: kombu_redis.QoS, delivery_tag: str) -> None:
    try:
        _original["ack"](self, delivery_tag)
    except ResponseError as error:
        _leave_unacked(self, delivery_tag, "acknowledged", error)


def _reject(self: kombu_redis.QoS, delivery_tag: str, requeue: bool = False) -> None:
    try:
        _original["reject"](self, delivery_tag, requeue)
    except ResponseError as error:
        _leave_unacked(self, delivery_tag, "rejected", error)


def _leave_unacked(self: kombu_redis.QoS, tag: str, what: str, error: ResponseError) -> None:
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


def _restore_visible(self: kombu_redis.QoS, *args: Any, **kwargs: Any) -> None:
    try:
        _original["restore_visible"](self, *args, **kwargs)
    except ResponseError as error:
        reason = refusal_of(error)
        if reason is None:
            raise
        _warn_now_and_then(
            "restore", "unacked messages not restored now: Redis refuses writes: %s", reason
        )


def _restore_unacked(self: kombu_redis.QoS, client: Any = None) -> None:
    try:
        _original["restore_unacked"](self, client)
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


def _brpop_read(self: kombu_redis.Channel, **options: Any) -> Any:
    try:
        return _original["_brpop_read"](self, **options)
    except ResponseError as error:
        reason = refusal_of(error)
        if reason is None:
            raise
        # BRPOP is a write (READONLY on a replica): pause before the hub sends the next one.
        _warn_now_and_then("brpop", "not fetching tasks: Redis refuses writes: %s", reason)
        time.sleep(MAX_PAUSE)
        raise Empty() from error


_original: dict[str, Callable[..., Any]] = {}


def install() -> None:
    """Patch kombu's Redis QoS and Channel (once) as described in the module docstring."""
    if _original:
        return
    patches: list[tuple[type, str, Callable[..., Any]]] = [
        (kombu_redis.QoS, "append", _append),
        (kombu_redis.QoS, "ack", _ack),
        (kombu_redis.QoS, "reject", _reject),
        (kombu_redis.QoS, "restore_visible", _restore_visible),
        (kombu_redis.QoS, "restore_unacked", _restore_unacked),
        (kombu_redis.Channel, "_brpop_read", _brpop_read),
    ]
    for owner, name, replacement in patches:
        _original[name] = getattr(owner, name)
        setattr(owner, name, replacement)
