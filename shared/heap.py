"""The garbage collector's share of a long-running process's CPU, kept small.

CPython's cyclic collector runs every 700 net allocations and, every so often, walks every
tracked object of the process. A process of FastAPI, pydantic, redis-py, Celery and kombu holds
hundreds of thousands of them (modules, classes, schemas) that live until exit, so those full
walks were a large share of the API's CPU per request under load (py-spy --native:
`gc_collect_main`). After start-up, `freeze_startup_heap` moves everything alive into the
permanent generation, which the collector never walks again; what requests allocate and drop
is still collected as before (reference counting frees most of it anyway).
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then freeze what survives; call when start-up is done. Returns how many
    objects were frozen (the permanent generation's size)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
