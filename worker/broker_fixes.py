"""Two guards around kombu 5.7's Redis transport, so a broker connection loss never ends a worker.

The failure (seen in CI, celery 5.7.0 / kombu 5.7.0 / redis-py 8.1.0, threads pool, late acks):

    consumer: Connection to broker lost. Trying to re-establish the connection...
    Restoring 15 unacknowledged message(s)
    Unrecoverable error: AttributeError("'NoneType' object has no attribute 'hostname'")
      hub.create_loop -> ... -> redis.py pool -> _get_pool -> _connparams

Why: with late acks, a task's ack is queued on the event loop (`Consumer.call_soon_ack`) when the
task ends. On the threads pool, tasks that were running when the connection dropped keep running
and end *after* Celery has closed the old connection: `Connection.collect()` closes its channels
(each restores its unacked messages to the queue: "Restoring N unacknowledged message(s)") and
then drops the transport's `client`. The queued acks then run in the *new* connection's loop, on
the old, closed channel. Its `QoS.ack` rebuilds a Redis pool from `transport.client`, which is
None: AttributeError. `Message.ack_log_error` only catches connection errors, the hub only
catches those too, so Celery calls it unrecoverable and the worker exits. When the channel still
has a pool the ack "succeeds" instead, and that is wrong as well: the message was already
restored with the same delivery tag, so the late ack can delete the unacked entry of its
redelivered copy (then lost if that copy's worker dies). The same AttributeError from a channel
used after its connection's transport was dropped is kombu#582 and kombu#970
(https://github.com/celery/kombu/issues/582, https://github.com/celery/kombu/issues/970);
the stalls after Redis reconnects are celery#8030 / celery#10205.

The fix, at the depth where it belongs (the transport's ack), applied by `install()`:
1. An ack or reject through a channel that is closed, or whose transport lost its client, does
   not touch Redis. The message is, or will be, restored (at close, or by the visibility timeout)
   and redelivered; a redelivered copy of a finished task does nothing (shared/records.py START).
2. Any other unexpected error from an ack/reject is logged loudly and swallowed: at-least-once
   delivery already covers an ack that did not happen, while letting it escape kills the worker.

Remove when kombu no longer uses closed channels for late acks (check the two tests in
tests/test_broker_fixes.py against a new kombu: they exercise the real transport).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kombu.message import Message
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

_INSTALLED = "_dispatcher_broker_fixes"


def channel_is_gone(channel: Any) -> bool:
    """True when the channel can no longer reach Redis: closed, or its transport was collected."""
    transport = getattr(channel, "connection", None)
    return bool(getattr(channel, "closed", False)) or getattr(transport, "client", None) is None


def _guard_qos(name: str) -> None:
    original: Callable[..., Any] = getattr(kombu_redis.QoS, name)

    def guarded(self: Any, delivery_tag: str, *args: Any, **kwargs: Any) -> Any:
        if channel_is_gone(self.channel):
            log.warning(
                "%s of message %s dropped: its broker connection was closed; the message is "
                "redelivered and its task, if it already ended, is not run again",
                name,
                delivery_tag,
            )
            return None
        return original(self, delivery_tag, *args, **kwargs)

    guarded.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(kombu_redis.QoS, name, guarded)


def _guard_log_error(name: str) -> None:
    original: Callable[..., Any] = getattr(Message, name)

    def guarded(self: Message, logger: Any, errors: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, logger, errors, *args, **kwargs)
        except (BrokenPipeError, *errors):  # logged by the original; Celery reconnects on these
            raise
        except Exception:
            log.critical(
                "%s of message %s failed; the worker keeps running and the message is "
                "redelivered after the visibility timeout",
                name,
                self.delivery_tag,
                exc_info=True,
            )
            return None

    guarded.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(Message, name, guarded)


def install() -> None:
    """Apply both guards once per process (worker/app.py calls it at import)."""
    if getattr(kombu_redis.QoS, _INSTALLED, False):
        return
    for name in ("ack", "reject"):
        _guard_qos(name)
    for name in ("ack_log_error", "reject_log_error"):
        _guard_log_error(name)
    setattr(kombu_redis.QoS, _INSTALLED, True)
