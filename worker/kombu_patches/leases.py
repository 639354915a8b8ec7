"""Lease renewal: a live worker pushes back the redelivery of every message it holds.

Not a patch of kombu's code, but a write into kombu's private data: the unacked index, a sorted
set of delivery tags scored by delivery time, whose name only kombu's `Channel` knows.

Symptom. With late acks, a task that runs longer than the visibility timeout is delivered a
second time while its first worker is still running it (tests/reliability/test_long_task.py
sees a second model call about one timeout in without the renewal).

Cause. Kombu's Redis transport redelivers an unacked message once its score in the unacked index
is older than the visibility timeout, whether or not its consumer is alive; it never renews it.

Upstream. celery#5935, long-running tasks redelivered after the visibility timeout
(https://github.com/celery/celery/issues/5935).

The fix: each heartbeat (worker/heartbeat.py) rescores the messages this worker holds to now; a
dead worker stops renewing, so its messages come back within the timeout. XX: an acked (removed)
message is never re-added. It assumes kombu's default key names (`unacked_index_key`, no
`global_keyprefix`): the dispatcher sets neither transport option.

Remove when kombu renews the deliveries of live consumers itself (look for an extend or
heartbeat of the unacked index in the new kombu's `QoS`), and keep test_long_task.py passing.
"""

from __future__ import annotations

import time

import redis
from celery.worker import state as worker_state
from kombu.transport.redis import Channel

# Messages the engine holds (worker/consumer.py): they never become Celery requests.
_held: set[str] = set()


def hold(tag: str) -> None:
    """Renew this message's lease each beat until `release`."""
    _held.add(tag)


def release(tag: str) -> None:
    _held.discard(tag)


def held_delivery_tags() -> list[str]:
    """The delivery tags of every message this worker holds: the engine's, and Celery's own
    requests (running or prefetched) for tasks that run in its pool."""
    try:
        requests = tuple(worker_state.requests.values())
        engine = tuple(_held)
    except RuntimeError:  # changed while copied; the next beat renews
        return []
    return [*engine, *(str(request.message.delivery_tag) for request in requests)]


def renew_leases(client: redis.Redis) -> None:
    """Rescore the messages this worker holds to now in kombu's unacked index (see above)."""
    tags = held_delivery_tags()
    if tags:
        client.zadd(Channel.unacked_index_key, dict.fromkeys(tags, time.time()), xx=True)
