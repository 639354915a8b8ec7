"""dispatcher_client against a fake service (httpx.MockTransport): request forms, retries and
Retry-After, the Idempotency-Key, error mapping, re-attaching after a 202, tasks, bytes out.
Batches and the async client: test_client_unit_batches.py."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from urllib.parse import parse_qs

import dispatcher_client as dc
import httpx
import pytest
from dispatcher_client import Binary, Dispatcher, RetryPolicy

from tests.support.client_fakes import BASE, FAST, PNG, TASK, Fake, accepted, error, task_body


@pytest.fixture
def fake() -> Fake:
    return Fake()


@pytest.fixture
def client(fake: Fake) -> Iterator[Dispatcher]:
    with Dispatcher(BASE, "key-1", retry=FAST, transport=httpx.MockTransport(fake)) as http:
        yield http


# --- predict: forms and values -------------------------------------------------------------------


def test_predict_sends_json_with_a_key_and_returns_the_value(
    fake: Fake, client: Dispatcher
) -> None:
    fake.on("POST", "/dispatch_model", httpx.Response(200, json=task_body(prediction_value=[1])))
    assert client.predict("echo", {"a": 1}, version="2.0", timeout=30, priority="batch") == [1]
    (sent,) = fake.requests
    assert json.loads(sent.content) == {
        "model_name": "echo",
        "input": {"a": 1},
        "model_version": "2.0",
        "timeout": 30,
        "priority": "batch",
    }
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["authorization"] == "Bearer key-1"
    assert sent.headers["prefer"] == "wait=60"
    assert len(sent.headers["idempotency-key"]) == 36  # a UUID, fresh per call


def test_bytes_go_as_the_raw_body_with_fields_in_the_query(fake: Fake, client: Dispatcher) -> None:
    fake.on("POST", "/dispatch_model", httpx.Response(200, json=task_body(prediction_value="ok")))
    client.predict("grayscale", data=PNG, content_type="image/png", version="1", timeout=5)
    (sent,) = fake.requests
    assert sent.content == PNG
    assert sent.headers["content-type"] == "image/png"
    assert parse_qs(sent.url.query.decode()) == {
        "model_name": ["grayscale"],
        "model_version": ["1"],
        "timeout": ["5"],
    }


def test_json_typed_bytes_go_as_a_data_uri(fake: Fake, client: Dispatcher) -> None:
    # As a raw body, application/json would be read as the JSON request form itself.
    fake.on("POST", "/dispatch_model", httpx.Response(200, json=task_body(prediction_value=1)))
    client.predict("mirror", data=b'{"x": 1}', content_type="application/json")
    body = json.loads(fake.requests[0].content)
    assert body["data"] == "data:application/json;base64," + base64.b64encode(b'{"x": 1}').decode()
    assert "input" not in body


def test_input_and_data_together_are_refused_before_sending(client: Dispatcher) -> None:
    with pytest.raises(ValueError, match="not both"):
        client.predict("echo", {"a": 1}, data=b"x")


def test_a_binary_answer_is_fetched_raw_with_its_content_type(
    fake: Fake, client: Dispatcher
) -> None:
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    fake.on("POST", "/dispatch_model", httpx.Response(200, json=task_body(prediction_value=uri)))
    fake.on(
        "GET",
        f"/tasks/{TASK}/result",
        httpx.Response(200, content=PNG, headers={"Content-Type": "image/png"}),
    )
    value = client.predict("grayscale", data=PNG, content_type="image/png")
    assert isinstance(value, Binary)
    assert value == PNG
    assert value.content_type == "image/png"


def test_text_that_looks_like_a_data_uri_stays_text(fake: Fake, client: Dispatcher) -> None:
    text = "data:x;base64,aGk="
    fake.on("POST", "/dispatch_model", httpx.Response(200, json=task_body(prediction_value=text)))
    fake.on(
        "GET",
        f"/tasks/{TASK}/result",
        httpx.Response(200, text=text, headers={"Content-Type": "text/plain; charset=utf-8"}),
    )
    assert client.predict("echo", "x") == text


# --- retries and the Idempotency-Key -------------------------------------------------------------


def test_429_is_retried_after_retry_after_with_the_same_key(fake: Fake) -> None:
    fake.on(
        "POST",
        "/dispatch_model",
        error(429, "queue_full", **{"Retry-After": "1"}),
        httpx.Response(200, json=task_body(prediction_value="done")),
    )
    with Dispatcher(BASE, transport=httpx.MockTransport(fake)) as client:
        started = time.monotonic()
        assert client.predict("echo", 1) == "done"
        elapsed = time.monotonic() - started
    first, second = fake.requests
    assert 1.0 <= elapsed < 3.0
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert first.content == second.content


def test_each_logical_call_gets_its_own_key(fake: Fake, client: Dispatcher) -> None:
    fake.on("POST", "/dispatch_model", httpx.Response(200, json=task_body(prediction_value=1)))
    client.predict("echo", 1)
    client.predict("echo", 1)
    keys = {r.headers["idempotency-key"] for r in fake.requests}
    assert len(keys) == 2


def test_retry_after_as_an_http_date(fake: Fake) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
    fake.on("POST", "/dispatch_model", error(503, "queue_unavailable", **{"Retry-After": when}))
    response = httpx.Response(503, headers={"Retry-After": when})
    assert 0.5 < dc._retry.retry_after(response) <= 2.0  # whole seconds in the date


def test_a_proxys_503_without_a_body_is_retried(fake: Fake, client: Dispatcher) -> None:
    fake.on(
        "POST",
        "/dispatch_model",
        httpx.Response(503, text="<html>upstream down</html>", headers={"Retry-After": "0"}),
        httpx.Response(200, json=task_body(prediction_value=2)),
    )
    assert client.predict("echo", 2) == 2
    assert len(fake.requests) == 2


def test_a_tasks_own_503_is_raised_not_retried(fake: Fake, client: Dispatcher) -> None:
    # The task ran and failed: a retry under the same key would only replay that failure.
    fake.on("POST", "/dispatch_model", error(503, "torchserve_unavailable", TASK))
    with pytest.raises(dc.ServiceUnavailable) as raised:
        client.predict("echo", 1)
    assert raised.value.task_id == TASK
    assert raised.value.code == "torchserve_unavailable"
    assert len(fake.requests) == 1


def test_redis_lost_mid_wait_is_retried_and_reattaches(fake: Fake, client: Dispatcher) -> None:
    fake.on(
        "POST",
        "/dispatch_model",
        error(503, "queue_unavailable", TASK),
        httpx.Response(
            200, json=task_body(prediction_value=3), headers={"Idempotent-Replayed": "true"}
        ),
    )
    assert client.predict("echo", 3) == 3
    keys = [r.headers["idempotency-key"] for r in fake.requests]
    assert len(keys) == 2
    assert keys[0] == keys[1]


def test_retries_are_bounded_by_attempts(fake: Fake, client: Dispatcher) -> None:
    fake.on("POST", "/dispatch_model", error(429, "queue_full", **{"Retry-After": "0"}))
    with pytest.raises(dc.QueueFull) as raised:
        client.predict("echo", 1)
    assert len(fake.requests) == FAST.max_attempts
    assert raised.value.status == 429
    assert raised.value.retry_after == 0


def test_a_retry_after_beyond_the_time_budget_is_not_slept(fake: Fake) -> None:
    fake.on("POST", "/dispatch_model", error(429, "queue_full", **{"Retry-After": "120"}))
    policy = RetryPolicy(max_attempts=5, max_elapsed=30)
    with Dispatcher(BASE, retry=policy, transport=httpx.MockTransport(fake)) as client:
        started = time.monotonic()
        with pytest.raises(dc.QueueFull) as raised:
            client.predict("echo", 1)
    assert time.monotonic() - started < 1
    assert raised.value.retry_after == 120
    assert len(fake.requests) == 1


def test_dropped_connections_are_retried_with_the_same_key(fake: Fake, client: Dispatcher) -> None:
    fake.on(
        "POST",
        "/dispatch_model",
        httpx.ConnectError("refused"),
        httpx.ReadError("reset"),
        httpx.Response(200, json=task_body(prediction_value=4)),
    )
    assert client.predict("echo", 4) == 4
    assert len({r.headers["idempotency-key"] for r in fake.requests}) == 1
    assert len(fake.requests) == 3


def test_no_answer_at_all_is_a_transport_error(fake: Fake, client: Dispatcher) -> None:
    fake.on("POST", "/dispatch_model", httpx.ConnectError("refused"))
    with pytest.raises(dc.TransportError, match="ConnectError") as raised:
        client.predict("echo", 1)
    assert raised.value.status == 0
    assert len(fake.requests) == FAST.max_attempts


@pytest.mark.parametrize("status", [400, 404, 422, 500, 502, 504])
def test_other_errors_are_not_retried(fake: Fake, client: Dispatcher, status: int) -> None:
    fake.on("POST", "/dispatch_model", error(status, "whatever"))
    with pytest.raises(dc.DispatcherError):
        client.predict("echo", 1)
    assert len(fake.requests) == 1


# --- error mapping -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "invalid_idempotency_key", dc.InvalidRequest),
        (401, "unauthorized", dc.Unauthorized),
        (403, "target_not_allowed", dc.Forbidden),
        (403, "webhook_not_allowed", dc.Forbidden),
        (404, "model_not_found", dc.ModelNotFound),
        (404, "task_not_found", dc.TaskNotFound),
        (404, "batch_not_found", dc.BatchNotFound),
        (409, "batch_finished", dc.Conflict),
        (409, "task_finished", dc.Conflict),
        (409, "canceled", dc.TaskCanceled),
        (413, "payload_too_large", dc.PayloadTooLarge),
        (422, "invalid_request", dc.InvalidRequest),
        (422, "idempotency_key_reused", dc.InvalidRequest),
        (422, "model_rejected_input", dc.ModelRejectedInput),
        (502, "torchserve_error", dc.ModelFailed),
        (502, "torchserve_auth_rejected", dc.ModelFailed),
        (503, "worker_lost", dc.ServiceUnavailable),
        (504, "deadline_exceeded", dc.TaskTimeout),
        (504, "expired", dc.TaskTimeout),
        (404, "code_from_a_newer_server", dc.NotFound),  # unknown codes: by status
        (418, "teapot", dc.DispatcherError),
    ],
)
def test_error_codes_map_to_their_class(
    fake: Fake, client: Dispatcher, status: int, code: str, cls: type[dc.DispatcherError]
) -> None:
    fake.on("POST", "/dispatch_model", error(status, code, TASK))
    with pytest.raises(dc.DispatcherError) as raised:
        client.predict("echo", 1)
    assert type(raised.value) is cls
    assert (raised.value.status, raised.value.code, raised.value.task_id) == (status, code, TASK)
    assert raised.value.message == f"{code} happened"
    assert code in str(raised.value)


def test_a_non_json_error_quotes_little_of_its_body(fake: Fake, client: Dispatcher) -> None:
    fake.on("POST", "/dispatch_model", httpx.Response(502, text="<html>" + "x" * 5000))
    with pytest.raises(dc.ModelFailed) as raised:
        client.predict("echo", 1)
    assert raised.value.code == "http_error"
    assert len(raised.value.message) < 300


# --- 202: re-attach, tasks -----------------------------------------------------------------------


def test_a_sync_wait_that_runs_out_reattaches_with_long_polls(
    fake: Fake, client: Dispatcher
) -> None:
    fake.on("POST", "/dispatch_model", accepted("running"))
    fake.on(
        "GET",
        f"/tasks/{TASK}",
        httpx.Response(200, json=task_body("running")),
        httpx.Response(200, json=task_body(prediction_value={"late": True})),
    )
    assert client.predict("slow", {"sleep": 90}) == {"late": True}
    assert len(fake.made("POST", "/dispatch_model")) == 1  # never resubmitted
    polls = fake.made("GET", f"/tasks/{TASK}")
    assert [p.url.params["wait"] for p in polls] == ["60", "60"]


def test_predict_wait_bounds_the_whole_call(fake: Fake, client: Dispatcher) -> None:
    fake.on("POST", "/dispatch_model", accepted("queued"))
    fake.on("GET", f"/tasks/{TASK}", httpx.Response(200, json=task_body("queued")))
    with pytest.raises(dc.WaitTimeout) as raised:
        client.predict("echo", 1, wait=0)
    assert raised.value.task_id == TASK
    assert fake.requests[0].headers["prefer"] == "respond-async"


def test_a_failed_task_raises_its_stored_error(fake: Fake, client: Dispatcher) -> None:
    stored = {"status": 502, "msg": "Prediction failed", "code": "torchserve_error"}
    fake.on("POST", "/dispatch_model", accepted())
    fake.on("GET", f"/tasks/{TASK}", httpx.Response(200, json=task_body("failed", error=stored)))
    with pytest.raises(dc.ModelFailed) as raised:
        client.predict("failing", {})
    assert (raised.value.task_id, raised.value.status) == (TASK, 502)


def test_submit_status_result_cancel(fake: Fake, client: Dispatcher) -> None:
    fake.on("POST", "/dispatch_model", accepted())
    fake.on(
        "GET",
        f"/tasks/{TASK}",
        httpx.Response(200, json=task_body("queued")),
        httpx.Response(200, json=task_body(prediction_value=7)),
    )
    fake.on("DELETE", f"/tasks/{TASK}", error(409, "task_finished", TASK))
    task = client.submit("echo", 7)
    assert task.task_id == TASK
    assert fake.requests[0].headers["prefer"] == "respond-async"
    info = task.status()
    assert (info.status, info.done, info.created_at) == (
        "queued",
        False,
        datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert task.result(timeout=5) == 7
    with pytest.raises(dc.Conflict):
        task.cancel()


def test_cancel_then_result_raises_task_canceled(fake: Fake, client: Dispatcher) -> None:
    canceled = task_body("canceled", error={"status": 409, "msg": "canceled", "code": "canceled"})
    fake.on("DELETE", f"/tasks/{TASK}", httpx.Response(200, json=canceled))
    fake.on("GET", f"/tasks/{TASK}", httpx.Response(200, json=canceled))
    task = client.task(TASK)
    assert task.cancel().status == "canceled"
    with pytest.raises(dc.TaskCanceled):
        task.result()


def test_data_uri_decoding() -> None:
    assert dc.decode_data_uri("data:image/png;base64," + base64.b64encode(PNG).decode()) == PNG
    assert dc.decode_data_uri("data:;base64,aGk=") == Binary(b"hi", "application/octet-stream")
    assert dc.decode_data_uri("data:text/plain,hi") is None
    assert dc.decode_data_uri("data:image/png;base64,not base64!") is None
    assert dc.decode_data_uri("hello") is None


def test_public_names() -> None:
    assert set(dc.__all__) == {name for name in dir(dc) if not name.startswith("_")} | {
        "__version__"
    }
    assert all(
        issubclass(getattr(dc, n), dc.DispatcherError)
        for n in dc.__all__
        if n.endswith(("Error", "Found", "Full"))
    )
