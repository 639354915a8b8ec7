"""Traces (shared/tracing.py): one trace from the API's request span through the worker's task
span to the TorchServe HTTP span, collected by the SDK's InMemorySpanExporter.

The API runs in-process (httpx's ASGITransport) on a private redis-server and submits a real task;
the test takes the message it pushed off the queue and runs the worker's task function on it,
with Celery's request context built from the message headers as a worker does, against the
session's real TorchServe. So the worker span's parent is whatever the API wrote into the
message, and the `headers` test model reports the traceparent TorchServe received.

Off, OpenTelemetry is not even imported (checked in a fresh interpreter).
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from api.main import create_app
from devstack import RedisServer, TorchServe
from shared import tracing
from shared.priorities import ALL_QUEUES
from shared.settings import Settings, get_settings
from tests.support.paths import REPO as REPO_ROOT

pytestmark = pytest.mark.e2e

REPO = REPO_ROOT
WORKER_NAME = "tracing@test"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.setup("tracing-test", exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()


@pytest.fixture
def worker_env(
    monkeypatch: pytest.MonkeyPatch, dedicated_redis: RedisServer, torchserve: TorchServe
) -> Iterator[None]:
    """The worker's settings (read from the environment) point at this test's servers."""
    from worker.consumer import shutdown_engine

    monkeypatch.setenv("REDIS_URL", dedicated_redis.url)
    monkeypatch.setenv("TORCHSERVE_URL", torchserve.inference_url)
    get_settings.cache_clear()
    try:
        yield
    finally:
        # The engine (started on first use, as in a worker) and its connections end with the test.
        shutdown_engine(10)
        get_settings.cache_clear()


def pop_message(redis_server: RedisServer) -> dict[str, Any]:
    """The one task message the API pushed (whichever queue its priority picked)."""
    with redis_server.client() as client:
        queues = [queue.encode() for queue in ALL_QUEUES if client.llen(queue)]
        messages = [m for key in queues for m in client.lrange(key, 0, -1)]
        assert len(messages) == 1, queues
        for key in queues:
            client.delete(key)
    envelope: dict[str, Any] = json.loads(messages[0])
    return envelope


def run_task(envelope: dict[str, Any]) -> None:
    """What a worker does with the message: the task body under a request built from it."""
    from worker.consumer import predict_many

    headers = envelope["headers"]
    assert headers["task"] == predict_many.name  # the one kind of message
    _, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
    predict_many.push_request(**headers, hostname=WORKER_NAME, delivery_info={})
    try:
        predict_many.run(**kwargs)
    finally:
        predict_many.pop_request()


def one(found: list[ReadableSpan], what: str) -> ReadableSpan:
    assert len(found) == 1, f"{what}: {[s.name for s in found]}"
    return found[0]


async def submit_and_run(settings: Settings, redis_server: RedisServer) -> tuple[Any, Any]:
    """Submit through the API (lifespan and all), run the task as a worker, read the result."""
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api,
    ):
        accepted = await api.post(
            "/dispatch_model",
            json={"model_name": "headers", "input": {}},
            headers={"Prefer": "respond-async", "X-Request-ID": "traced-1"},
        )
        assert accepted.status_code == 202, accepted.text
        envelope = pop_message(redis_server)
        await asyncio.to_thread(run_task, envelope)  # the worker's engine has its own loop
        done = await api.get(f"/tasks/{accepted.json()['task_id']}")
    return envelope, done


@pytest.mark.usefixtures("worker_env")
def test_one_trace_from_the_api_through_the_worker_to_torchserve(
    spans: InMemorySpanExporter, dedicated_redis: RedisServer, torchserve: TorchServe
) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=dedicated_redis.url,
        torchserve_url=torchserve.inference_url,
    )
    envelope, done = asyncio.run(submit_and_run(settings, dedicated_redis))
    assert done.json()["status"] == "succeeded", done.text

    finished = spans.get_finished_spans()
    server = one(
        [s for s in finished if s.kind == SpanKind.SERVER and "dispatch_model" in s.name], "API"
    )
    task = one([s for s in finished if s.kind == SpanKind.CONSUMER], "worker")
    torchserve_call = one(
        [s for s in finished if s.kind == SpanKind.CLIENT and s.name.startswith("POST")],
        "TorchServe",
    )
    redis_calls = [s for s in finished if s.attributes and s.attributes.get("db.system") == "redis"]
    trace_id = server.context.trace_id
    print(
        f"\nTRACE {trace_id:032x}: {len(finished)} spans: "
        + ", ".join(sorted({f"{s.kind.name}:{s.name}" for s in finished}))
    )
    # The message carries the API's context with its task (a message may carry several
    # requests' tasks); the worker span continues it.
    _, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
    carried = kwargs["tasks"][0]["headers"]
    assert carried["traceparent"].split("-")[1] == f"{trace_id:032x}"
    assert carried["request_id"] == "traced-1"
    assert task.context.trace_id == trace_id
    assert task.parent is not None
    assert task.parent.span_id == server.context.span_id
    assert task.parent.is_remote  # it came through the message, not this process's context
    assert task.name == "dispatch.predict"
    # The TorchServe call is the worker span's child, and TorchServe got that context.
    assert torchserve_call.context.trace_id == trace_id
    assert torchserve_call.parent is not None
    assert torchserve_call.parent.span_id == task.context.span_id
    seen = done.json()["prediction_value"]
    assert seen["x_request_id"] == "traced-1"
    assert seen["traceparent"].split("-")[1] == f"{trace_id:032x}"
    assert seen["traceparent"].split("-")[2] == f"{torchserve_call.context.span_id:016x}"
    # The dispatcher's own Redis calls are in the trace too (API and worker), all one trace id.
    assert any(s.parent and s.parent.span_id == server.context.span_id for s in redis_calls)
    assert any(s.parent and s.parent.span_id == task.context.span_id for s in redis_calls)
    request_spans = [s for s in finished if s.context.trace_id == trace_id]
    assert {server, task, torchserve_call} <= set(request_spans)


def test_off_nothing_of_opentelemetry_is_imported() -> None:
    # redis-py 8 imports parts of OpenTelemetry itself when they are installed (its own
    # observability hooks): that is the baseline; the dispatcher must add nothing to it.
    code = """
import json, os, sys
os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
import celery, fastapi, httpx, redis, redis.asyncio
baseline = {m for m in sys.modules if m.startswith("opentelemetry")}
from api.main import create_app
from shared.celery_app import encode_task_message
from shared.settings import Settings
import worker.consumer
create_app(Settings(_env_file=None))
headers = json.loads(encode_task_message("t", {}))["headers"]
assert "traceparent" not in headers
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry") and m not in baseline)
assert not loaded, loaded
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_the_endpoint_variable_turns_it_on_and_a_missing_extra_only_warns() -> None:
    code = """
import os, sys
os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"
from shared import tracing
assert tracing.setup("x")
from opentelemetry import trace
assert trace.get_tracer_provider() is tracing._state.provider
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # Without the extra installed (simulated: its modules cannot be imported), tracing stays off.
    blocked = """
import os, sys
os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"
sys.modules["opentelemetry.sdk"] = None
import logging
logging.basicConfig()
from shared import tracing
assert not tracing.setup("x")
"""
    result = subprocess.run(
        [sys.executable, "-c", blocked], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'model-dispatcher[otel]'" in result.stderr
