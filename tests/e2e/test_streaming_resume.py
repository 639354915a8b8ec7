"""A streamed task's SSE connection dropped and resumed, and read after its end (issue 18).

Real stack (redis-server, Celery workers, TorchServe's `streaming` model, the API). A client
reads a few events, closes its connection while the model is still producing, and reconnects
with `Last-Event-ID` (or `?last_event_id=`): across both connections it must get every event
exactly once, in order, the same as one uninterrupted read. A reader that comes after the end
gets the whole history then `done`; one that resumes from `done` gets 204.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from devstack import Stack
from tests.support.sse_reader import Event, Reading, event_ms, read_events

pytestmark = pytest.mark.e2e

CHUNKS, DELAY = 8, 0.25
BODY = {"model_name": "streaming", "input": {"chunks": CHUNKS, "delay": DELAY}, "stream": True}
DROP_AFTER = 3


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api_url, timeout=30) as client:
        yield client


def submit_streamed(http: httpx.Client) -> str:
    answer = http.post("/dispatch_model", json=BODY, headers={"Prefer": "respond-async"})
    assert answer.status_code == 202, answer.text
    stream_url: str = answer.json()["stream_url"]
    return stream_url


def seen(events: list[Event]) -> list[tuple[str, str, str]]:
    """What a client got, without the arrival times."""
    return [(event.kind, event.id, event.data) for event in events]


def check_complete(history: Reading) -> None:
    """A finished `streaming` task's whole stream: each piece once, in order, then done."""
    assert [event.kind for event in history.events] == ["output"] * CHUNKS + ["done"]
    assert [event.json()["i"] for event in history.outputs] == list(range(CHUNKS))
    assert history.events[-1].json()["status"] == "succeeded"
    assert len(set(history.ids)) == len(history.ids)


@pytest.mark.parametrize("resume_with", ["header", "query"])
def test_a_dropped_stream_resumes_after_its_last_event(
    http: httpx.Client, resume_with: str
) -> None:
    stream_url = submit_streamed(http)
    first = read_events(http, stream_url, drop_after=DROP_AFTER)
    assert first.dropped, first
    assert [event.kind for event in first.events] == ["output"] * DROP_AFTER
    last_id = first.events[-1].id
    if resume_with == "header":
        second = read_events(http, stream_url, last_event_id=last_id)
    else:
        second = read_events(http, stream_url, params={"last_event_id": last_id})
    assert second.status == 200
    assert not second.dropped
    # One uninterrupted read of the same stream, after its end.
    history = read_events(http, stream_url)
    check_complete(history)
    # Across both connections: every event exactly once, none missing, in order.
    assert seen(first.events) + seen(second.events) == seen(history.events)
    # The resume came while the model was still producing: it read history, then live events.
    assert second.opened < event_ms(second.outputs[-1].id), (second.opened, second.ids)
    assert second.retry == 2000  # every response tells an EventSource how long to wait


def test_the_header_wins_over_the_query(http: httpx.Client) -> None:
    """A browser keeps its first URL (query) but sends its newest id in the header."""
    stream_url = submit_streamed(http)
    history = read_events(http, stream_url)
    check_complete(history)
    ids = history.ids
    both = read_events(http, stream_url, last_event_id=ids[5], params={"last_event_id": ids[1]})
    assert seen(both.events) == seen(history.events[6:])


def test_a_late_reader_gets_the_whole_history_then_done(http: httpx.Client) -> None:
    stream_url = submit_streamed(http)
    task_id = stream_url.split("/")[2]
    # Wait for the end without reading the stream.
    view = http.get(f"/tasks/{task_id}", params={"wait": 30}).json()
    assert view["status"] == "succeeded", view
    late = read_events(http, stream_url)
    check_complete(late)
    final = late.events[-1].json()
    assert final["task_id"] == task_id
    assert final["prediction_value"] == view["prediction_value"]
    # Readers later still, from any event: the rest of the history, the same each time.
    again = read_events(http, stream_url)
    assert seen(again.events) == seen(late.events)
    middle = read_events(http, stream_url, last_event_id=late.ids[3])
    assert seen(middle.events) == seen(late.events[4:])
    # Resuming from `done`: nothing follows, 204 (an EventSource stops there).
    done_id = late.ids[-1]
    for resumed in (
        read_events(http, stream_url, last_event_id=done_id),
        read_events(http, stream_url, params={"last_event_id": done_id}),
    ):
        assert resumed.status == 204, resumed
        assert resumed.events == []
    # Resuming from the last output: only `done` is left.
    last = read_events(http, stream_url, last_event_id=late.ids[-2])
    assert seen(last.events) == seen(late.events[-1:])
