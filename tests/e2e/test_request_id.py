"""X-Request-ID end to end: echoed on every response, carried through the Celery message to the
worker and on to TorchServe (a handler reads it), bound to the JSON log lines of its task in the
API and the worker.

Real redis-server, Celery worker, TorchServe and API (with its access log on); the `headers`
test model answers the X-Request-ID header it received.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import ApiServer, Stack
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e


# Celery prints (never logs) this one line when it stops; everything else is a log line.
CELERY_SHUTDOWN_NOTICE = "worker: Warm shutdown (MainProcess)"


@pytest.fixture
def json_stack(stack_factory: StackFactory, tmp_path: Path) -> Iterator[tuple[ApiServer, Stack]]:
    """A worker and an API with LOG_FORMAT=json and the access log on."""
    stack = stack_factory.start(
        workers=1, env={"LOG_FORMAT": "json", "RETRY_MAX_ATTEMPTS": "1"}, webhook_consumers=0
    )
    # The stack's own API has no access log (devstack's default); this one logs every request.
    api = ApiServer(stack.env, tmp_path / "api-access.log", access_log=True)
    try:
        yield api.start(), stack
    finally:
        api.stop()


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a log, each of which must be one JSON object."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        if line == CELERY_SHUTDOWN_NOTICE:
            continue
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"{path.name}: not a JSON line: {line[:200]}")
    return parsed


def test_request_ids_reach_the_handler_and_tie_the_logs_together(
    json_stack: tuple[ApiServer, Stack],
) -> None:
    api, stack = json_stack
    mine = f"client-{uuid.uuid4()}"
    failing_id = f"failing-{uuid.uuid4()}"
    with httpx.Client(base_url=api.url, timeout=30) as http:
        sent = http.post(
            "/dispatch_model",
            json={"model_name": "headers", "input": {}},
            headers={"X-Request-ID": mine},
        )
        generated = http.post("/dispatch_model", json={"model_name": "headers", "input": {}})
        failed = http.post(
            "/dispatch_model",
            json={"model_name": "failing", "input": {}},
            headers={"X-Request-ID": failing_id},
        )
        not_found = http.get(f"/tasks/{uuid.uuid4()}")
        invalid_body = http.post("/dispatch_model", json={"model_name": "a/b"})
        too_long = http.get("/health", headers={"X-Request-ID": "x" * 129})
        control = http.get("/health", headers={"X-Request-ID": "a\tb"})
        exactly_128 = http.get("/health", headers={"X-Request-ID": "y" * 128})

    # The handler saw the client's id, and a generated one when the client sent none.
    assert sent.status_code == 200, sent.text
    assert sent.headers["x-request-id"] == mine
    assert sent.json()["prediction_value"]["x_request_id"] == mine
    assert generated.status_code == 200, generated.text
    generated_id = generated.headers["x-request-id"]
    assert len(generated_id) == 32
    assert generated.json()["prediction_value"]["x_request_id"] == generated_id
    # Echoed on errors too; a bad header is a 400 naming it, answered with a fresh id.
    assert failed.status_code == 502
    assert failed.headers["x-request-id"] == failing_id
    assert not_found.status_code == 404
    assert invalid_body.status_code == 422
    for error in (not_found, invalid_body):
        assert len(error.headers["x-request-id"]) == 32
    for bad in (too_long, control):
        assert bad.status_code == 400, bad.text
        assert bad.json()["code"] == "invalid_request_id"
        assert "X-Request-ID" in bad.json()["msg"]
        assert len(bad.headers["x-request-id"]) == 32
    assert exactly_128.status_code == 200
    assert exactly_128.headers["x-request-id"] == "y" * 128

    api.stop()
    stack.stop()  # start-up to shutdown: every line each process wrote
    api_lines = json_lines(api.log_path)
    worker_lines = json_lines(stack.workers[0].log_path)
    sent_task = sent.json()["task_id"]
    failed_task = failed.json()["task_id"]
    print(f"\nREQUEST IDS: {len(api_lines)} API and {len(worker_lines)} worker JSON log lines")
    # uvicorn's and Celery's own loggers come out as JSON lines too.
    assert {"uvicorn.error", "uvicorn.access"} <= {line["logger"] for line in api_lines}
    assert any(line["logger"].startswith("celery") for line in worker_lines)
    assert all({"timestamp", "level", "logger", "event"} <= set(line) for line in api_lines)
    # API: the access line of each dispatch carries its request id, task id and model.
    access = {
        line.get("request_id"): line for line in api_lines if line["logger"] == "uvicorn.access"
    }
    assert access[mine]["task_id"] == sent_task
    assert access[mine]["model"] == "headers"
    assert access[failing_id]["task_id"] == failed_task
    assert access[failing_id]["model"] == "failing"
    # Requests on one keep-alive connection do not inherit each other's task.
    assert "task_id" not in access[not_found.headers["x-request-id"]]
    # Worker: the failure line of the failing task carries the same three.
    failures = [line for line in worker_lines if line.get("task_id") == failed_task]
    assert failures, "no worker log line for the failing task"
    assert all(line["request_id"] == failing_id for line in failures)
    assert all(line["model"] == "failing" for line in failures)
