"""The order a general worker reads the priority classes' queues in (kombu's queue cycle)."""

from __future__ import annotations

from kombu.utils.scheduling import cycle_by_name

from shared.celery_app import create_celery_app
from shared.priorities import ALL_QUEUES, LOWER_FIRST_EVERY, InteractiveFirst
from shared.settings import Settings

INTERACTIVE, DEFAULT, BATCH = ALL_QUEUES


def test_interactive_first_whatever_order_the_queues_were_given_in() -> None:
    cycle = InteractiveFirst()
    cycle.update([BATCH, "other", DEFAULT, INTERACTIVE])
    assert cycle.consume(4) == [INTERACTIVE, DEFAULT, BATCH, "other"]


def test_every_nth_fetch_names_the_lower_classes_first() -> None:
    """Under a flood of interactive work, batch still gets one fetch in LOWER_FIRST_EVERY."""
    cycle = InteractiveFirst()
    cycle.update(list(ALL_QUEUES))
    firsts = []
    for _ in range(4 * LOWER_FIRST_EVERY):
        order = cycle.consume(3)
        firsts.append(order[0])
        cycle.rotate(order[0])  # BRPOP popped from the first list named (all non-empty)
    assert firsts.count(BATCH) == 4
    assert firsts.count(INTERACTIVE) == 4 * (LOWER_FIRST_EVERY - 1)
    # Polls that pop nothing (empty queues, a BRPOP timeout) do not advance the rotation.
    cycle = InteractiveFirst()
    cycle.update(list(ALL_QUEUES))
    assert {cycle.consume(3)[0] for _ in range(10)} == {INTERACTIVE}


def test_the_celery_app_uses_it_and_fetches_only_into_free_slots() -> None:
    app = create_celery_app(Settings(_env_file=None))
    strategy = app.conf.broker_transport_options["queue_order_strategy"]
    assert cycle_by_name(strategy) is InteractiveFirst
    assert app.conf.worker_disable_prefetch is True
    assert app.conf.worker_prefetch_multiplier == 1
