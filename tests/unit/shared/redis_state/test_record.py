"""The task record's encoding and decoding, stored answers and the idempotency record."""

from __future__ import annotations

import base64
import json
import time

import pytest

from shared.backends import Protocol, Target
from shared.errors import TaskExpired
from shared.models import TaskStatus
from shared.priorities import Priority
from shared.redis_state.published import parse_published, published_task_id
from shared.redis_state.record import (
    TERMINAL,
    NewTask,
    Outcome,
    answer_bytes,
    as_mapping,
    charset_of,
    decode_record,
    idempotency_record,
    parse_idempotency_record,
    recorded_operation,
)


def test_a_submitted_record_decodes_to_its_view() -> None:
    now = time.time()
    new = NewTask("echo", None, "http://ts", now + 5, Priority.batch, "https://h", ("task.failed",))
    fields = as_mapping(new.fields(now, "alice"))
    assert fields["webhook_events"] == "task.failed"
    assert fields["model_version"] == ""
    view = decode_record("t", fields)
    assert (view.status, view.priority, view.model_version) == ("queued", Priority.batch, None)
    assert view.created_at.timestamp() == pytest.approx(now)
    assert view.deadline.timestamp() == pytest.approx(now + 5)
    assert (view.deliveries, view.worker, view.cancel_requested) == (0, None, False)


def test_a_batch_item_carries_its_custom_id_and_no_webhook_without_one() -> None:
    item = NewTask("m", "2.0", "o", 1.5, Priority.default, custom_id="row-1")
    fields = as_mapping(item.item_fields())
    assert fields == {
        "model_name": "m", "model_version": "2.0", "origin": "o", "backend": "torchserve",
        "deadline": "1.5", "custom_id": "row-1", "priority": "default",
    }  # fmt: skip


def test_a_record_keeps_its_backend_and_an_operation_other_than_the_default() -> None:
    oip = Target("mls", Protocol.oip, "http://h:9", "generate")
    new = NewTask(
        "m", None, oip.origin, 9.0, Priority.default, backend="mls",
        operation=recorded_operation(oip),
    )  # fmt: skip
    view = decode_record("t", as_mapping(new.fields(1.0, "o")))
    assert (view.backend, view.operation) == ("mls", "generate")
    default = Target("mls", Protocol.oip, "http://h:9", "infer")
    assert recorded_operation(default) is None
    plain = as_mapping(NewTask("m", None, "o", 9.0, Priority.default).fields(1.0, "o"))
    assert "operation" not in plain
    # A record from before backends names none: it went to TorchServe.
    del plain["backend"]
    assert (decode_record("t", plain).backend, decode_record("t", plain).operation) == (
        "torchserve",
        None,
    )


def test_outcomes_encode_answers_and_errors() -> None:
    text = Outcome.succeeded("t", "héllo", "text/plain; charset=latin-1")
    assert (text.field, json.loads(text.value)) == ("result", "héllo")
    assert text.extra == ["result_type", "text/plain; charset=latin-1"]
    assert Outcome.succeeded("t", {"a": 1}).extra == []
    failed = Outcome.failed("t", TaskExpired("late"))
    assert (failed.status, failed.field) == (TaskStatus.failed, "error")
    assert json.loads(failed.value)["task_id"] == "t"


def test_a_stored_answer_gives_back_the_bytes_torchserve_sent() -> None:
    assert answer_bytes("héllo", "text/plain; charset=latin-1") == "héllo".encode("latin-1")
    assert answer_bytes("héllo", "text/plain") == "héllo".encode()
    data = "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()
    assert answer_bytes(data, "image/png") == b"\x89PNG"
    assert charset_of('text/csv; header=present; Charset="utf-16"') == "utf-16"
    assert charset_of(None) == charset_of("text/plain") == "utf-8"


def test_the_idempotency_record_round_trips() -> None:
    held = idempotency_record("ab12", "task-1")
    assert held == "ab12:task-1"
    assert parse_idempotency_record(held) == ("ab12", "task-1")


def test_published_messages() -> None:
    assert parse_published('["t1"]') == ("t1", None)
    assert parse_published('["t2", ["status", "failed"]]') == ("t2", {"status": "failed"})
    assert published_task_id('["t3", ["status", "failed"]]') == "t3"


def test_terminal_statuses() -> None:
    assert set(TERMINAL) == {"succeeded", "failed", "canceled", "expired"}
