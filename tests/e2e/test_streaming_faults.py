"""Streams through faults (issue 18): a worker SIGKILLed mid-stream, a streamed task canceled.

Real processes only: a private redis-server per test (stack_factory), Celery workers, the API,
and the session's TorchServe `streaming` model (2 model workers: a call the dispatcher let go
of still runs to its end in its model worker, the next one gets the other).

- SIGKILL: the worker running a streamed task is killed after its first outputs; with short
  leases (as tests/reliability/test_worker_kill.py) the other worker gets the task again. The
  stream shows the first attempt's outputs, `restart`, the whole second attempt, then `done`
  with deliveries == 2: nothing lost, nothing repeated without the mark between.
- Cancel: DELETE of a streaming task answers `canceled` at once and its stream ends with that
  `done`; its worker stops the call at the next chunk, seen two ways on a worker that may hold
  one task (WORKER_MAX_IN_FLIGHT=1): its TCP connection to TorchServe closes, and a task waiting
  behind it starts, both long before the model would have finished sending.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import TorchServe, wait_until
from tests.support.faults import records
from tests.support.sse_reader import Event, Reading, read_events
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

# Short leases so a dead worker's task comes back in seconds (tests/reliability/test_worker_kill).
FAST_REDELIVERY = {
    "BROKER_VISIBILITY_TIMEOUT": "4",
    "WORKER_HEARTBEAT_INTERVAL": "1",
    "DISPATCH_DEFAULT_TIMEOUT": "120",
}
_ESTABLISHED = "01"  # /proc/net/tcp's state column


def submit_streamed(http: httpx.Client, value: dict[str, Any]) -> tuple[str, str]:
    body = {"model_name": "streaming", "input": value, "stream": True}
    answer = http.post("/dispatch_model", json=body, headers={"Prefer": "respond-async"})
    assert answer.status_code == 202, answer.text
    return answer.json()["task_id"], answer.json()["stream_url"]


def seen(events: list[Event]) -> list[tuple[str, str, str]]:
    return [(event.kind, event.id, event.data) for event in events]


def when(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def on_output(number: int, action: Callable[[Event], None]) -> Callable[[Event], None]:
    """An `on_event` hook that runs `action` when the `number`-th output arrives."""
    count = [0]

    def hook(event: Event) -> None:
        if event.kind == "output":
            count[0] += 1
            if count[0] == number:
                action(event)

    return hook


# --- SIGKILL mid-stream -------------------------------------------------------------------------

KILL_CHUNKS, KILL_DELAY, KILL_AFTER = 8, 0.3, 3


def test_sigkill_mid_stream_restarts_and_streams_the_whole_second_attempt(
    stack_factory: StackFactory,
) -> None:
    stack = stack_factory.start(workers=2, env=FAST_REDELIVERY)
    redis = stack_factory.redis_server.client()
    killed: dict[str, Any] = {}

    def kill_its_worker(event: Event) -> None:
        record = records(redis, [task_id])[task_id]
        assert record["status"] == "running", record
        name = record["worker"].split("@")[0]
        victim = next(worker for worker in stack.workers if worker.name == name)
        victim.kill()  # SIGKILL the whole worker: no warm shutdown, no requeue, no ack
        killed.update(at=time.time(), name=name)

    with httpx.Client(base_url=stack.api_url, timeout=30) as http:
        value = {"chunks": KILL_CHUNKS, "delay": KILL_DELAY}
        task_id, stream_url = submit_streamed(http, value)
        live = read_events(http, stream_url, on_event=on_output(KILL_AFTER, kill_its_worker))
        history = read_events(http, stream_url)
    assert killed, "the kill did not happen"
    kinds = [event.kind for event in live.events]
    restart = kinds.index("restart")
    before, after = live.events[:restart], live.events[restart + 1 : -1]
    print(
        f"\nSTREAM SIGKILL: {len(before)} outputs before the kill, restart "
        f"{live.events[restart].arrived - killed['at']:.1f}s after it (visibility timeout 4 s), "
        f"then {len(after)} outputs and {kinds[-1]}"
    )
    # The first attempt's outputs (at least those seen before the kill, never all of them), the
    # restart mark, the whole second attempt, done.
    assert KILL_AFTER <= len(before) < KILL_CHUNKS, kinds
    assert kinds == ["output"] * len(before) + ["restart"] + ["output"] * KILL_CHUNKS + ["done"]
    assert [event.json()["i"] for event in before] == list(range(len(before)))
    assert [event.json()["i"] for event in after] == list(range(KILL_CHUNKS))
    assert live.events[restart].json() == {"attempt": 2}
    # The first attempt's pieces were sent before the kill, the second's after it: a new run.
    assert all(event.json()["t"] < killed["at"] for event in before)
    assert all(event.json()["t"] > killed["at"] for event in after)
    final = live.events[-1].json()
    assert final["status"] == "succeeded", final
    assert final["deliveries"] == 2
    assert final["worker"].split("@")[0] != killed["name"]
    # The final result is the second attempt's body, exactly.
    assert [event.json() for event in after] == [
        json.loads(line) for line in final["prediction_value"].splitlines()
    ]
    # One connection saw it all, as the stream holds it: ids unique and growing.
    assert seen(history.events) == seen(live.events)
    assert len(set(live.ids)) == len(live.ids)
    assert not any(event.kind == "error" for event in live.events)


# --- cancel mid-stream --------------------------------------------------------------------------

CANCEL_CHUNKS, CANCEL_DELAY = 20, 0.3


def torchserve_connections(pid: int, port: int) -> set[int]:
    """The local ports of `pid`'s established TCP connections to 127.0.0.1:`port`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = fd.readlink().as_posix()
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    local = set()
    for row in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        columns = row.split()
        remote_port = int(columns[2].rsplit(":", 1)[1], 16)
        if columns[3] == _ESTABLISHED and columns[9] in inodes and remote_port == port:
            local.add(int(columns[1].rsplit(":", 1)[1], 16))
    return local


def test_cancel_mid_stream_ends_the_stream_and_stops_the_call(
    stack_factory: StackFactory, torchserve: TorchServe
) -> None:
    stack = stack_factory.start(workers=1, env={"WORKER_MAX_IN_FLIGHT": "1"})
    worker = stack.workers[0]
    port = int(torchserve.inference_url.rsplit(":", 1)[1])
    state: dict[str, Any] = {}

    with httpx.Client(base_url=stack.api_url, timeout=30) as http:

        def queue_another(event: Event) -> None:
            # The worker's call to TorchServe is A's; B (echo, not streamed) waits for its slot.
            state["calls"] = torchserve_connections(worker.pid, port)
            answer = http.post(
                "/dispatch_model",
                json={"model_name": "echo", "input": {"behind": "a"}},
                headers={"Prefer": "respond-async"},
            )
            assert answer.status_code == 202, answer.text
            state["b"] = answer.json()["task_id"]

        def cancel(event: Event) -> None:
            waiting = http.get(f"/tasks/{state['b']}").json()
            state["b_status_before"] = waiting["status"]
            state["canceling"] = time.time()
            state["answer"] = http.delete(f"/tasks/{task_a}")
            state["canceled"] = time.time()

        hooks = [on_output(1, queue_another), on_output(3, cancel)]

        def on_event(event: Event) -> None:
            for hook in hooks:
                hook(event)

        task_a, stream_url = submit_streamed(http, {"chunks": CANCEL_CHUNKS, "delay": CANCEL_DELAY})
        live = read_events(http, stream_url, on_event=on_event)
        closed_at = wait_until(
            lambda: not (torchserve_connections(worker.pid, port) & state["calls"]) and time.time(),
            10,
            "the worker's connection of A to TorchServe to close",
        )
        b_view = http.get(f"/tasks/{state['b']}", params={"wait": 30}).json()
        a_view = http.get(f"/tasks/{task_a}").json()
        history = read_events(http, stream_url)
    _check_cancel(live, history, state, a_view, b_view, closed_at)


def _check_cancel(
    live: Reading,
    history: Reading,
    state: dict[str, Any],
    a_view: dict[str, Any],
    b_view: dict[str, Any],
    closed_at: float,
) -> None:
    answer: httpx.Response = state["answer"]
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "canceled"
    assert len(state["calls"]) == 1, state  # A's streamed call was the worker's only one
    assert state["b_status_before"] == "queued"  # B waited behind A for two chunks
    # The stream: A's outputs up to the cancel, then its done (canceled), right after the DELETE.
    kinds = [event.kind for event in live.events]
    assert kinds[-1] == "done"
    assert set(kinds[:-1]) == {"output"}
    pieces = [event.json() for event in live.outputs]
    assert 3 <= len(pieces) < CANCEL_CHUNKS
    assert [piece["i"] for piece in pieces] == list(range(len(pieces)))
    final = live.events[-1].json()
    assert final["status"] == "canceled", final
    done_delay = live.events[-1].arrived - state["canceled"]
    assert done_delay < 1.0, done_delay
    # What the model would still have sent: its last piece at piece 0's t + 19 delays.
    model_end = pieces[0]["t"] + (CANCEL_CHUNKS - 1) * CANCEL_DELAY
    b_started = when(b_view["started_at"])
    print(
        f"\nSTREAM CANCEL: done {done_delay * 1000:.0f} ms after the DELETE; A's TCP connection "
        f"to TorchServe closed {closed_at - state['canceling']:.2f}s after it; the task behind "
        f"started {b_started - state['canceling']:.2f}s after it; the model would have sent "
        f"until {model_end - state['canceling']:.1f}s after it"
    )
    # The worker let go at the next chunk (one delay), with room for a busy machine, and in any
    # case seconds before the model was done.
    assert closed_at - state["canceling"] < CANCEL_DELAY + 1.5
    assert b_started - state["canceling"] < CANCEL_DELAY + 1.5
    assert max(closed_at, b_started) < model_end - 2.0
    assert b_view["status"] == "succeeded"
    assert b_view["prediction_value"] == {"behind": "a"}
    # Canceled it stays (the worker's stopped call stored nothing over it), and nothing was
    # appended after done: a later reader sees the same stream.
    assert a_view["status"] == "canceled", a_view
    assert seen(history.events) == seen(live.events)
