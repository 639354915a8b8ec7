"""Two guards so a broker connection loss never ends a worker: acks on closed channels, and any
other error escaping an ack.

Symptom (seen in CI, celery 5.7.0 / kombu 5.7.0 / redis-py 8.1.0, threads pool, late acks):

    consumer: Connection to broker lost. Trying to re-establish the connection...
    Restoring 15 unacknowledged message(s)
    Unrecoverable error: AttributeError("'NoneType' object has no attribute 'hostname'")
      hub.create_loop -> ... -> redis.py pool -> _get_pool -> _connparams

Cause. With late acks, a task's ack is queued on the event loop (`Consumer.call_soon_ack`) when
the task ends. On the threads pool, tasks that were running when the connection dropped keep
running and end *after* Celery has closed the old connection: `Connection.collect()` closes its
channels (each restores its unacked messages to the queue: "Restoring N unacknowledged
message(s)") and then drops the transport's `client`. The queued acks then run in the *new*
connection's loop, on the old, closed channel. Its `QoS.ack` rebuilds a Redis pool from
`transport.client`, which is None: AttributeError. `Message.ack_log_error` only catches
connection errors, the hub only catches those too, so Celery calls it unrecoverable and the worker
exits. When the channel still has a pool the ack "succeeds" instead, and that is wrong as well:
the message was already restored with the same delivery tag, so the late ack can delete the
unacked entry of its redelivered copy (then lost if that copy's worker dies).

Upstream. The same AttributeError from a channel used after its connection's transport was
dropped is kombu#582 and kombu#970 (https://github.com/celery/kombu/issues/582,
https://github.com/celery/kombu/issues/970); the stalls after Redis reconnects are celery#8030 /
celery#10205.

The fix, at the depth where it belongs (the transport's ack):
1. An ack or reject through a channel that is closed, or whose transport lost its client, does
   not touch Redis (`drop_if_gone`, the first step of worker/kombu_patches/acks.py). The message
   is, or will be, restored (at close, or by the visibility timeout) and redelivered; a
   redelivered copy of a finished task does nothing (START skips it).
2. Any other unexpected error from an ack/reject is logged loudly and swallowed
   (`ack_log_error`, `reject_log_error`): at-least-once delivery already covers an ack that did
   not happen, while letting it escape kills the worker. Connection errors still reach Celery,
   which reconnects on them.

Remove when kombu no longer uses closed channels for late acks: run the tests of this guard in
tests/unit/worker/test_kombu_patches.py against the new kombu (they drive the real transport and
first show what the unguarded code does).
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.message import Message

from worker.kombu_patches.originals import original

log = logging.getLogger(__name__)


def channel_is_gone(channel: Any) -> bool:
    """True when the channel can no longer reach Redis: closed, or its transport was collected."""
    transport = getattr(channel, "connection", None)
    return bool(getattr(channel, "closed", False)) or getattr(transport, "client", None) is None


def drop_if_gone(qos: Any, what: str, delivery_tag: str) -> bool:
    """True (and a warning) when `what` ("ack", "reject") of the message must not reach Redis."""
    if not channel_is_gone(qos.channel):
        return False
    log.warning(
        "%s of message %s dropped: its broker connection was closed; the message is "
        "redelivered and its task, if it already ended, is not run again",
        what,
        delivery_tag,
    )
    return True


def _log_error(name: str, message: Message, logger: Any, errors: Any, *a: Any, **kw: Any) -> Any:
    try:
        return original(f"Message.{name}")(message, logger, errors, *a, **kw)
    except (BrokenPipeError, *errors):  # logged by the original; Celery reconnects on these
        raise
    except Exception:
        log.critical(
            "%s of message %s failed; the worker keeps running and the message is "
            "redelivered after the visibility timeout",
            name,
            message.delivery_tag,
            exc_info=True,
        )
        return None


def ack_log_error(self: Message, logger: Any, errors: Any, *args: Any, **kwargs: Any) -> Any:
    """`Message.ack_log_error`, the outermost layer of a Celery ack (see the module docstring)."""
    return _log_error("ack_log_error", self, logger, errors, *args, **kwargs)


def reject_log_error(self: Message, logger: Any, errors: Any, *args: Any, **kwargs: Any) -> Any:
    """`Message.reject_log_error`, as `ack_log_error`."""
    return _log_error("reject_log_error", self, logger, errors, *args, **kwargs)
