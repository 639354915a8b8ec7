"""task.output webhooks against the real stack: TorchServe's `streaming` model (12 chunks 0.1 s
apart) streamed through the real API and Celery worker, the events sent by the real webhook
consumer to a real local receiver, every signature checked with the Standard Webhooks reference
library (`standardwebhooks`), not with our code.

Two tasks stream at once (TorchServe serves `streaming` with 2 workers), so the pacing is seen
per task. For each: its task.output deliveries are read at least 0.5 s apart (the bodies'
timestamps) and arrive about that far apart, they number fewer than the chunks (coalesced),
they carry every chunk exactly once and in order, chained by their stream ids (each `from` the
previous `last_event_id`), and GET /tasks/{id}/stream after one delivery's `last_event_id`
returns exactly the outputs the later deliveries carried; task.succeeded carries the final
result as GET /tasks/{id} shows it.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from devstack import Stack, wait_until
from shared.redis_state.keys import output_key
from tests.support.stack import StackFactory
from tests.support.webhook_receiver import Received, Receiver

pytestmark = pytest.mark.e2e

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CHUNKS, DELAY = 12, 0.1
INTERVAL = 0.5  # shared/webhook_output.py PACING.interval
# Arrival gaps: the send of the next one starts >= 0.5 s after the previous one was read; what
# each spends between its read and reaching the receiver (a thread, a connection) varies a bit.
ARRIVAL_SLACK = 0.1
TASKS = 2


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hook_stack(stack_factory: StackFactory, receiver: Receiver) -> Stack:
    env = {"WEBHOOK_ALLOWED_ORIGINS": receiver.origin, "WEBHOOK_SECRET": SECRET}
    return stack_factory.start(workers=1, env=env)


def _verified(request: Received) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(SECRET).verify(request.body, request.headers)
    return payload


def _at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def _sse_outputs(text: str) -> list[tuple[str, Any]]:
    """(id, data) of the `output` events of an SSE answer."""
    found = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if fields.get("event") == "output":
            found.append((fields["id"], json.loads(fields["data"])))
    return found


def test_task_output_is_coalesced_paced_and_carries_every_chunk_once(
    hook_stack: Stack, stack_factory: StackFactory, receiver: Receiver
) -> None:
    paths = ["/out/" + uuid.uuid4().hex[:10] for _ in range(TASKS)]
    with httpx.Client(base_url=hook_stack.api_url, timeout=30) as http:
        refused = http.post(
            "/dispatch_model",
            json={"model_name": "streaming", "webhook": receiver.origin + paths[0],
                  "webhook_events": ["task.output"]},
        )  # fmt: skip
        assert refused.status_code == 422, refused.text
        assert "stream" in refused.json()["msg"]
        task_ids = []
        for path in paths:
            answer = http.post(
                "/dispatch_model",
                headers={"Prefer": "respond-async"},
                json={
                    "model_name": "streaming",
                    "input": {"chunks": CHUNKS, "delay": DELAY},
                    "stream": True,
                    "webhook": receiver.origin + path,
                    "webhook_events": ["task.output", "task.succeeded"],
                },
            )
            assert answer.status_code == 202, answer.text
            task_ids.append(answer.json()["task_id"])
        with stack_factory.redis_server.client(decode_responses=True) as r:
            for task_id, path in zip(task_ids, paths, strict=True):
                _check_task(http, r, receiver, task_id, path)


def _check_task(http: httpx.Client, r: Any, receiver: Receiver, task_id: str, path: str) -> None:
    def task_output_sent() -> bool:
        # Once the task ended no task.output starts (its pending one, if any, is counted).
        view = http.get(f"/tasks/{task_id}").json()
        if view["status"] != "succeeded":
            return False
        made = int(r.hget(output_key(task_id), "seq") or 0)
        types = [json.loads(request.body)["type"] for request in list(receiver.received[path])]
        return 0 < made <= types.count("task.output") and "task.succeeded" in types

    wait_until(task_output_sent, 30, f"every task.output of {task_id}", 0.1)
    requests = list(receiver.received[path])
    events = [(request, _verified(request)) for request in requests]
    outputs = sorted(
        ((req, e) for req, e in events if e["type"] == "task.output"),
        key=lambda pair: pair[1]["data"]["seq"],
    )
    made = int(r.hget(output_key(task_id), "seq"))
    # One request per event (each answered 204 at once: no retry), each its own webhook-id.
    assert [e["data"]["seq"] for _, e in outputs] == list(range(1, made + 1))
    assert len({req.headers["webhook-id"] for req, _ in outputs}) == made
    assert 2 <= made < CHUNKS  # coalesced: 12 chunks over ~1.1 s in a few deliveries
    # Every chunk exactly once, in order, chained by stream ids.
    chunks = [item for _, e in outputs for item in e["data"]["events"]]
    assert [c["event"] for c in chunks] == ["output"] * CHUNKS
    assert [c["data"]["i"] for c in chunks] == list(range(CHUNKS))
    previous = "0-0"
    for _, event in outputs:
        data = event["data"]
        assert (data["task_id"], data["from"]) == (task_id, previous)
        assert data["last_event_id"] == data["events"][-1]["id"]
        assert data["final"] == (data["status"] == "succeeded")  # no cap cut these short
        previous = data["last_event_id"]
    # Paced: read at least 0.5 s apart, and arriving about that far apart.
    reads = [_at(e) for _, e in outputs]
    arrivals = [req.at for req, _ in outputs]
    read_gaps = [b - a for a, b in itertools.pairwise(reads)]
    arrival_gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert min(read_gaps) >= INTERVAL - 1e-3, read_gaps
    assert min(arrival_gaps) >= INTERVAL - ARRIVAL_SLACK, arrival_gaps
    # A receiver goes on from any delivery's last_event_id on the task's stream.
    after = outputs[0][1]["data"]["last_event_id"]
    stream = http.get(f"/tasks/{task_id}/stream", params={"last_event_id": after}, timeout=15)
    later = [(c["id"], c["data"]) for c in chunks[len(outputs[0][1]["data"]["events"]) :]]
    assert _sse_outputs(stream.text) == later
    # task.succeeded: the final result, as GET /tasks/{id} shows it.
    (succeeded,) = [e for _, e in events if e["type"] == "task.succeeded"]
    view = http.get(f"/tasks/{task_id}").json()
    assert succeeded["data"]["status"] == "succeeded"
    assert succeeded["data"]["prediction_value"] == view["prediction_value"]
    deliveries = http.get(f"/tasks/{task_id}/deliveries").json()["attempts"]
    assert (
        sorted(a["outcome"] for a in deliveries if a["event"] == "task.output")
        == ["delivered"] * made
    )
    print(
        f"\nTASK.OUTPUT {task_id[:8]}: {made} deliveries for {CHUNKS} chunks; read gaps "
        f"{[round(g, 3) for g in read_gaps]} s, arrival gaps "
        f"{[round(g, 3) for g in arrival_gaps]} s"
    )
