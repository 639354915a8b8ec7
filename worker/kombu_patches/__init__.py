"""Everything the workers change in, or write into, kombu's Redis transport: one place, one order.

Both Celery apps (worker/app.py, worker/webhook_app.py) call `install()` once at import. It
replaces these attributes of kombu 5.7, in this order, each exactly once (kombu's own function is
kept in originals.py and called from the replacement):

1. `Message.ack_log_error`, `Message.reject_log_error` (closed_channel.py): nothing but a
   connection error escapes an ack or reject to end the worker.
2. `QoS.ack`, `QoS.reject` (acks.py): first the closed-channel guard (closed_channel.py), then
   kombu's Redis call, where a refused write leaves the message unacked (refusals.py).
3. `QoS.append` (refusals.py): a fetched message waits until Redis accepts it in the unacked set.
4. `QoS.restore_visible` (refusals.py): a refused visibility-timeout sweep waits for the next.
5. `QoS.restore_unacked` (refusals.py): a closing channel leaves refused messages unacked.
6. `Channel._brpop_read` (refusals.py): a refused BRPOP pauses fetching instead of crashing.
7. `Channel._create_client` (one_client.py): one synchronous redis-py client per channel.

Why this order: it is the path of an ack from Celery down to Redis, outermost first. Celery calls
(1), which calls `Message.ack`, which reaches (2) through the channel; (2) must drop an ack on a
closed channel before anything talks to Redis (such an ack would delete the unacked entry of the
redelivered copy), and only then treat a refusal; whatever (2) lets through, (1) logs and
swallows. (3)-(6) are the QoS's and the channel's other Redis calls. The synchronous ones, (2)-(5),
get their client from (7), last and innermost, which an ack on a closed channel never reaches.
As each attribute is replaced once by one function, no wrapper's behaviour depends on which
install call ran first, as it did when two modules wrapped `QoS.ack` one over the other.

Kombu internals used without replacing anything, also here so that kombu's private names are
known in this package only:

- leases.py, `renew_leases`: worker/heartbeat.py rescores the held messages in kombu's unacked
  index (`Channel.unacked_index_key`) each beat, so only a dead worker's messages are redelivered.
- broker_primary.py: a thread of each worker ends kombu's broker connections that are on a node
  the sentinels no longer name as the primary, so Celery reconnects to the new one at once.
- queue_cycle.py, `InteractiveFirst`: the queue cycle (kombu's private cycle protocol) named by
  `queue_order_strategy` in shared/celery_app.py, ordering a general worker's BRPOP by class.

Each module says the symptom, the cause, the upstream issue and when it can be removed; the tests
are tests/unit/worker/test_kombu_patches.py and test_kombu_refusals.py (real transport, real
redis-server) and, end to end, tests/reliability/test_redis_refuses_writes.py and
test_redis_outage.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kombu.message import Message
from kombu.transport import redis as kombu_redis

from worker.kombu_patches import acks, broker_primary, closed_channel, one_client, refusals
from worker.kombu_patches.leases import renew_leases
from worker.kombu_patches.originals import ORIGINALS
from worker.kombu_patches.queue_cycle import InteractiveFirst
from worker.kombu_patches.refusals import retry_while_refused, retry_while_refused_async

__all__ = [
    "PATCHES",
    "InteractiveFirst",
    "broker_primary",
    "install",
    "installed",
    "renew_leases",
    "retry_while_refused",
    "retry_while_refused_async",
]


@dataclass(frozen=True, slots=True)
class Patch:
    owner: type
    name: str
    replacement: Callable[..., Any]

    @property
    def target(self) -> str:
        return f"{self.owner.__name__}.{self.name}"


# The order of the module docstring's list.
PATCHES: tuple[Patch, ...] = (
    Patch(Message, "ack_log_error", closed_channel.ack_log_error),
    Patch(Message, "reject_log_error", closed_channel.reject_log_error),
    Patch(kombu_redis.QoS, "ack", acks.ack),
    Patch(kombu_redis.QoS, "reject", acks.reject),
    Patch(kombu_redis.QoS, "append", refusals.append),
    Patch(kombu_redis.QoS, "restore_visible", refusals.restore_visible),
    Patch(kombu_redis.QoS, "restore_unacked", refusals.restore_unacked),
    Patch(kombu_redis.Channel, "_brpop_read", refusals.brpop_read),
    Patch(kombu_redis.Channel, "_create_client", one_client.create_client),
)

# Marks kombu itself (not this module, which a test may import anew) as patched: the targets,
# in the order they were applied.
_INSTALLED = "_dispatcher_kombu_patches"


def install() -> None:
    """Apply PATCHES in order, once per process; later calls change nothing."""
    if installed():
        return
    for patch in PATCHES:
        kombus = getattr(patch.owner, patch.name)
        ORIGINALS[patch.target] = kombus
        patch.replacement.__wrapped__ = kombus  # type: ignore[attr-defined]
        setattr(patch.owner, patch.name, patch.replacement)
    setattr(kombu_redis.Channel, _INSTALLED, tuple(patch.target for patch in PATCHES))


def installed() -> tuple[str, ...]:
    """The targets install() replaced, in the order it replaced them (empty before it ran)."""
    applied: tuple[str, ...] = getattr(kombu_redis.Channel, _INSTALLED, ())
    return applied
