"""Streamed TorchServe outputs end to end (issue 18): real redis-server, Celery workers, TorchServe.

The session's TorchServe serves the test model `streaming` (tests/support/models/streaming.py)
with 2 workers: each piece is one HTTP/1.1 chunk carrying the model's own send time `t`. A
streamed task is read as a client reads it (tests/support/sse_reader.py stamps each event when
it arrives), both ways the API offers: the 202's `stream_url`, and a POST whose answer is the
stream itself. Checked: every piece arrives, in order, as an `output` whose data is the piece;
the first one reaches the client while the model is still producing; `done` carries what the
same request returns without streaming (and what TorchServe itself sends). The time to first
event and the per-chunk latency the dispatcher adds (client arrival minus the model's `t`) are
printed. A model that does not stream gives one output, then done.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devstack import Stack, TorchServe
from tests.support.sse_reader import EVENT_STREAM, Reading, read_events

pytestmark = pytest.mark.e2e

CHUNKS, DELAY = 8, 0.25
TIMED = {"chunks": CHUNKS, "delay": DELAY}


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api_url, timeout=30) as client:
        yield client


def accepted_stream(http: httpx.Client, body: dict[str, Any]) -> tuple[str, str]:
    """Submit `body` streamed and asynchronously: its task id and stream_url."""
    answer = http.post(
        "/dispatch_model", json={**body, "stream": True}, headers={"Prefer": "respond-async"}
    )
    assert answer.status_code == 202, answer.text
    accepted = answer.json()
    task_id = accepted["task_id"]
    assert accepted["stream_url"] == f"/tasks/{task_id}/stream"
    assert accepted["status_url"] == f"/tasks/{task_id}"
    return task_id, accepted["stream_url"]


def stream_by_url(http: httpx.Client, body: dict[str, Any]) -> tuple[str, Reading]:
    task_id, stream_url = accepted_stream(http, body)
    return task_id, read_events(http, stream_url)


def stream_by_post(http: httpx.Client, body: dict[str, Any]) -> tuple[str, Reading]:
    """POST with a wait (the default) and `Accept: text/event-stream`: the answer is the stream."""
    reading = read_events(
        http, "/dispatch_model", method="POST", json_body={**body, "stream": True}
    )
    assert reading.status == 200, reading
    location = reading.headers["content-location"]
    assert location.startswith("/tasks/"), location
    assert location.endswith("/stream"), location
    return location.split("/")[2], reading


READERS = {"stream_url": stream_by_url, "post_accept_sse": stream_by_post}


def unstreamed(http: httpx.Client, body: dict[str, Any]) -> Any:
    answer = http.post("/dispatch_model", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "succeeded"
    return answer.json()["prediction_value"]


def direct(torchserve: TorchServe, model: str, value: Any) -> str:
    answer = httpx.post(f"{torchserve.inference_url}/predictions/{model}", json=value, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.text


def piece_of(data: Any) -> dict[str, Any]:
    """A `streaming` piece from an output event's parsed data: the chunk's JSON, as an object
    (TorchServe's chunks come without a Content-Type, so JSON is parsed, as a whole answer is)."""
    assert isinstance(data, dict), data
    assert set(data) == {"i", "of", "t"}, data
    return data


def lines_of(value: Any) -> list[dict[str, Any]]:
    """The pieces in a final answer: the model's body, one JSON line each."""
    assert isinstance(value, str), value
    return [json.loads(line) for line in value.splitlines()]


def untimed(pieces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: value for key, value in piece.items() if key != "t"} for piece in pieces]


def check_well_formed(reading: Reading, task_id: str) -> dict[str, Any]:
    """The SSE framing every stream has; returns the `done` event's task view."""
    assert reading.status == 200
    assert reading.headers["content-type"].startswith(EVENT_STREAM)
    assert reading.headers["cache-control"] == "no-cache"
    assert reading.retry == 2000
    ids = reading.ids
    assert all(ids), ids
    assert len(set(ids)) == len(ids), ids
    order = [tuple(int(part) for part in event_id.split("-")) for event_id in ids]
    assert order == sorted(order), ids
    assert [event.kind for event in reading.events][-1] == "done"
    final: dict[str, Any] = reading.events[-1].json()
    assert final["task_id"] == task_id
    return final


@pytest.mark.parametrize("read", READERS.values(), ids=READERS.keys())
def test_every_piece_arrives_in_order_while_the_model_streams(
    http: httpx.Client, torchserve: TorchServe, read: Any
) -> None:
    body = {"model_name": "streaming", "input": TIMED}
    task_id, reading = read(http, body)
    final = check_well_formed(reading, task_id)
    kinds = [event.kind for event in reading.events]
    assert kinds == ["output"] * CHUNKS + ["done"], kinds
    outputs = reading.outputs
    pieces = [piece_of(event.json()) for event in outputs]
    assert [piece["i"] for piece in pieces] == list(range(CHUNKS))
    assert {piece["of"] for piece in pieces} == {CHUNKS}
    # The final result is the model's whole body (its JSON lines, not one JSON: text), and
    # each output is one of its lines, exactly.
    assert final["status"] == "succeeded"
    assert lines_of(final["prediction_value"]) == pieces
    # ... and what the same request returns without streaming, and straight from TorchServe
    # (each run stamps its own send times, the rest is equal).
    plain = untimed(lines_of(unstreamed(http, body)))
    assert untimed(lines_of(final["prediction_value"])) == plain
    assert untimed(lines_of(direct(torchserve, "streaming", TIMED))) == plain

    sent = [float(piece["t"]) for piece in pieces]
    arrived = [event.arrived for event in outputs]
    first_event = arrived[0] - sent[0]
    added = sorted(arrival - t for arrival, t in zip(arrived, sent, strict=True))
    print(
        f"\nSTREAM {read.__name__}: {CHUNKS} chunks {DELAY}s apart; time to first event "
        f"{first_event * 1000:.1f} ms (client arrival - model's t of piece 0); per-chunk "
        f"added latency p50 {statistics.median(added) * 1000:.1f} ms, "
        f"max {added[-1] * 1000:.1f} ms"
    )
    # Streamed, not buffered: the first piece reached the client before the model had sent its
    # third (and so long before its last); no piece came before the model sent it.
    assert arrived[0] < sent[2] < sent[-1], (arrived, sent)
    assert added[0] > 0, added
    assert added[-1] < DELAY * 2, added  # no piece waited for the next one


@pytest.mark.parametrize("read", READERS.values(), ids=READERS.keys())
def test_text_pieces_join_to_the_unstreamed_answer(
    http: httpx.Client, torchserve: TorchServe, read: Any
) -> None:
    value = {"chunks": 5, "delay": 0.05, "text": True}
    body = {"model_name": "streaming", "input": value}
    task_id, reading = read(http, body)
    final = check_well_formed(reading, task_id)
    # Each output is the chunk as the model sent it, a JSON string here.
    assert [event.json() for event in reading.outputs] == [f"tok{i} " for i in range(5)]
    assert [event.data for event in reading.outputs] == [f'"tok{i} "' for i in range(5)]
    expected = "tok0 tok1 tok2 tok3 tok4 "
    assert final["status"] == "succeeded"
    assert final["prediction_value"] == expected
    assert unstreamed(http, body) == expected
    assert direct(torchserve, "streaming", value) == expected


@pytest.mark.parametrize("read", READERS.values(), ids=READERS.keys())
def test_a_model_that_does_not_stream_gives_one_output_then_done(
    http: httpx.Client, torchserve: TorchServe, read: Any
) -> None:
    value = {"words": ["a", "b"], "n": 3, "nested": {"x": [1.5, None, True]}}
    body = {"model_name": "echo", "input": value}
    task_id, reading = read(http, body)
    final = check_well_formed(reading, task_id)
    assert [event.kind for event in reading.events] == ["output", "done"]
    assert reading.outputs[0].json() == value
    assert final["status"] == "succeeded"
    assert final["prediction_value"] == value
    assert unstreamed(http, body) == value
    assert json.loads(direct(torchserve, "echo", value)) == value
