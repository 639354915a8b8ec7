"""Metrics without servers: the API in-process (Redis unreachable), the worker's hooks with a
TorchServe faked by tests/support/upstream_fakes.py. The real scrape by Prometheus:
test_metrics_prometheus.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from api.main import create_app
from api.metrics import count_rejection
from devstack.processes import free_port
from shared.errors import ModelNotFound, TorchServeUnavailable
from shared.models import PredictionCall
from shared.priorities import Priority
from shared.prometheus import OTHER_MODEL, UNKNOWN_MODEL, ModelLabels
from shared.settings import Settings
from tests.support.upstream_fakes import FakeUpstream, answer
from worker import task_metrics as worker_metrics
from worker.backends import Caller

KEY = "metrics-test-key-1"
TS = "torchserve"  # the backend label of calls to TORCHSERVE_URL


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def settings(**overrides: object) -> Settings:
    # A port nothing listens on: Redis is down, which the API reports as 503, not as a crash.
    url = f"redis://127.0.0.1:{free_port()}/0"
    return Settings(_env_file=None, redis_url=url, **overrides)  # type: ignore[arg-type]


@asynccontextmanager
async def api(config: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_requests_are_counted_by_route_template_not_path() -> None:
    async def run() -> str:
        async with api(settings()) as client:
            for _ in range(3):
                response = await client.get(f"/tasks/{uuid.uuid4()}")
                assert response.status_code == 503  # Redis is down
            assert (await client.get(f"/no-such-page/{uuid.uuid4()}")).status_code == 404
            assert (await client.get("/docs/static/swagger-ui.css")).status_code == 200
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
            assert metrics.headers["content-type"].startswith("text/plain")
            return metrics.text

    before = value(
        "dispatcher_http_requests_total", route="/tasks/{task_id}", method="GET", status="503"
    )
    text = asyncio.run(run())
    samples = scrape(text)
    key = (
        "dispatcher_http_requests_total",
        (("method", "GET"), ("route", "/tasks/{task_id}"), ("status", "503")),
    )
    assert samples[key] == before + 3
    routes = {dict(labels).get("route") for name, labels in samples if "http_requests" in name}
    assert "unmatched" in routes
    assert "/docs/static/{path}" in routes
    assert not [route for route in routes if route and ("-" in route or "no-such" in route)]
    histogram = (
        "dispatcher_http_request_duration_seconds_count",
        (("method", "GET"), ("route", "/tasks/{task_id}")),
    )
    assert samples[histogram] >= 3
    # Redis is unreachable: the scrape still answers, and says so instead of reporting zeros.
    assert samples[("dispatcher_redis_up", ())] == 0
    assert not [name for name, _ in samples if name == "dispatcher_queue_depth"]
    assert "_created" not in text


def test_refused_submissions_are_counted_by_code() -> None:
    codes = ("unauthorized", "invalid_request", "queue_unavailable")
    before = {code: value("dispatcher_submit_rejections_total", code=code) for code in codes}
    submitted = value("dispatcher_tasks_submitted_total", model="echo", priority="default")

    async def run() -> None:
        async with api(settings(dispatcher_api_keys=KEY)) as client:
            body = {"model_name": "echo", "input": 1}
            assert (await client.post("/dispatch_model", json=body)).status_code == 401
            keyed = {"X-API-Key": KEY}
            bad = await client.post("/dispatch_model", json={"input": 1}, headers=keyed)
            assert bad.status_code == 422
            down = await client.post("/dispatch_model", json=body, headers=keyed)
            assert down.status_code == 503

    asyncio.run(run())
    for code in codes:
        assert value("dispatcher_submit_rejections_total", code=code) == before[code] + 1, code
    assert value("dispatcher_tasks_submitted_total", model="echo", priority="default") == submitted


def test_an_error_of_an_accepted_task_is_no_rejection() -> None:
    before = value("dispatcher_submit_rejections_total", code="model_not_found")
    count_rejection(
        b'{"status":404,"msg":"Model not found","code":"model_not_found","task_id":"t"}'
    )
    assert value("dispatcher_submit_rejections_total", code="model_not_found") == before
    weird = value("dispatcher_submit_rejections_total", code="other")
    count_rejection(b'{"status":500,"code":"<script>"}')
    count_rejection(b"not json")
    assert value("dispatcher_submit_rejections_total", code="other") == weird + 2


def test_metrics_need_a_key_only_when_configured() -> None:
    async def status(config: Settings, headers: dict[str, str]) -> int:
        async with api(config) as client:
            return (await client.get("/metrics", headers=headers)).status_code

    keyed = settings(dispatcher_api_keys=KEY)
    assert asyncio.run(status(keyed, {})) == 200  # public by default, even with API keys
    required = settings(dispatcher_api_keys=KEY, metrics_require_key=True)
    assert asyncio.run(status(required, {})) == 401
    assert asyncio.run(status(required, {"Authorization": f"Bearer {KEY}"})) == 200


def test_model_labels_stay_bounded() -> None:
    labels = ModelLabels(limit=2)
    assert [labels(name) for name in ("a", "b", "c", "a", "d", "b")] == [
        "a", "b", OTHER_MODEL, "a", OTHER_MODEL, "b"
    ]  # fmt: skip


# --- worker side -------------------------------------------------------------------------------


def call(model: str, submitted_ago: float = 2.0) -> PredictionCall:
    now = time.time()
    return PredictionCall(
        origin="http://127.0.0.1:8080",
        model_name=model,
        model_version=None,
        body={"x": 1},
        deadline=now + 60,
        submitted_at=now - submitted_ago,
        priority=Priority.default,
    )


def ts_value(name: str, **labels: str) -> float:
    """A worker metric's value for calls to the `torchserve` backend."""
    return value(name, backend=TS, **labels)


def test_task_outcomes_and_durations() -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    observed = worker_metrics.TaskObservation(call(model, submitted_ago=2.0), deliveries=2)
    observed.finished("succeeded")
    finished = "dispatcher_tasks_finished_total"
    assert ts_value(finished, model=model, status="succeeded", code="ok") == 1
    assert ts_value("dispatcher_redeliveries_total", model=model) == 1
    # A call without a priority (from an older API) was in the default class's queue.
    waited = ts_value("dispatcher_task_queue_wait_seconds_sum", model=model, priority="default")
    assert waited >= 2.0
    assert ts_value("dispatcher_task_total_seconds_count", model=model, priority="default") == 1
    assert ts_value("dispatcher_task_run_seconds_sum", model=model) < 1.0

    for deliveries, status, code in [
        (0, "skipped", "duplicate"),
        (1, "expired", "expired"),
        (3, "failed", "deadline_exceeded"),
    ]:
        worker_metrics.TaskObservation(call(model), deliveries).skipped()
        assert ts_value(finished, model=model, status=status, code=code) == 1

    labels = {"model": UNKNOWN_MODEL, "status": "failed", "code": ModelNotFound.code}
    missing = ts_value(finished, **labels)
    worker_metrics.TaskObservation(call("no-such-model"), 1).finished("failed", ModelNotFound.code)
    assert ts_value(finished, **labels) == missing + 1


def test_torchserve_attempts_and_retries() -> None:
    model = f"ts-{uuid.uuid4().hex[:8]}"
    answers = iter([answer(503, {"type": "ServiceUnavailableException"}),
                    answer(200, {"ok": True})])  # fmt: skip

    async def no_sleep(_: float) -> None:
        pass

    client = Caller(Settings(_env_file=None), FakeUpstream(lambda _: next(answers)), no_sleep)
    assert asyncio.run(client.predict(call(model))) == {"ok": True}
    unavailable = TorchServeUnavailable.code
    assert value("dispatcher_torchserve_retries_total", model=model, code=unavailable) == 1
    durations = "dispatcher_torchserve_request_duration_seconds_count"
    assert value(durations, model=model, outcome=unavailable) == 1
    assert value(durations, model=model, outcome="ok") == 1
    # The names of every backend, with the backend's name (the TorchServe ones above stay).
    retries = "dispatcher_backend_retries_total"
    assert value(retries, backend=TS, model=model, code=unavailable) == 1
    durations = "dispatcher_backend_request_duration_seconds_count"
    assert value(durations, backend=TS, model=model, outcome=unavailable) == 1
    assert value(durations, backend=TS, model=model, outcome="ok") == 1


def test_worker_metrics_can_be_turned_off() -> None:
    assert worker_metrics.serve(Settings(_env_file=None, worker_metrics_port=0)) is None


def test_worker_serves_metrics_and_survives_a_taken_port() -> None:
    config = Settings(
        _env_file=None, worker_metrics_port=free_port(), worker_metrics_host="127.0.0.1"
    )
    server = worker_metrics.serve(config)
    assert server is not None
    try:
        # A second server on the same port: the worker logs it and keeps working without one.
        assert worker_metrics.serve(config) is None
        url = f"http://127.0.0.1:{config.worker_metrics_port}/metrics"
        text = httpx.get(url, timeout=5).text
        assert "# TYPE dispatcher_tasks_finished_total counter" in text
        assert "# TYPE dispatcher_torchserve_request_duration_seconds histogram" in text
        assert "# TYPE dispatcher_backend_request_duration_seconds histogram" in text
    finally:
        server.shutdown()
        server.server_close()
