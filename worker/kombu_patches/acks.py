"""`QoS.ack` and `QoS.reject`: one wrapper each, two steps in a fixed order.

Two patches need the transport's ack and reject (closed_channel.py: a late ack through a closed
channel; refusals.py: a Redis that refuses writes). Both live in this one function instead of
two wrappers stacked by the order of their install calls:

1. Closed-channel guard first: an ack through a channel whose connection was collected must not
   reach Redis at all (it would delete the unacked entry of the redelivered copy, or crash on
   the dropped transport), whatever Redis would have answered.
2. Then the Redis call, kombu's own; if Redis refuses the write (OOM, READONLY), the message
   stays unacked and comes back after the visibility timeout (refusals.leave_unacked). Any other
   error reply is raised, and `Message.ack_log_error` (closed_channel.py) decides what it does.

Remove each step when its module's removal condition holds; this file goes when both do.
"""

from __future__ import annotations

from kombu.transport import redis as kombu_redis
from redis.exceptions import ResponseError

from worker.kombu_patches.closed_channel import drop_if_gone
from worker.kombu_patches.originals import original
from worker.kombu_patches.refusals import leave_unacked


def ack(self: kombu_redis.QoS, delivery_tag: str) -> None:
    """`QoS.ack`: the guard, then kombu's ack, a refusal leaving the message unacked."""
    if drop_if_gone(self, "ack", delivery_tag):
        return
    try:
        original("QoS.ack")(self, delivery_tag)
    except ResponseError as error:
        leave_unacked(self, delivery_tag, "acknowledged", error)


def reject(self: kombu_redis.QoS, delivery_tag: str, requeue: bool = False) -> None:
    """`QoS.reject`: as `ack`."""
    if drop_if_gone(self, "reject", delivery_tag):
        return
    try:
        original("QoS.reject")(self, delivery_tag, requeue)
    except ResponseError as error:
        leave_unacked(self, delivery_tag, "rejected", error)
