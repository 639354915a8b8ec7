"""A real Prometheus scrapes the API and a worker; PromQL over its HTTP API sees the dispatches.

Also: queue depth counts the tasks workers prefetched (they leave the list), and several API
processes (`uvicorn --workers 2`) report as one through PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devstack.processes import ManagedProcess, free_port, wait_until
from devstack.services import CeleryWorker
from tests.support.paths import REPO as REPO_ROOT
from tests.support.stack import StackFactory, require_tool

pytestmark = pytest.mark.e2e

PROMETHEUS = shutil.which("prometheus")
SUCCEEDED = 8
UNKNOWN = 2


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[PrometheusServer]:
    require_tool(
        PROMETHEUS is not None,
        "no `prometheus` binary: apt-get install prometheus (scripts/bootstrap.sh)",
    )
    server = PrometheusServer(tmp_path / "prometheus")
    try:
        yield server
    finally:
        server.stop()


class PrometheusServer:
    """Debian's Prometheus on a free 127.0.0.1 port, with its own config and data directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: ManagedProcess | None = None

    def start(self, targets: dict[str, str]) -> None:
        """Scrape each `job: host:port` every second."""
        assert PROMETHEUS is not None
        self.root.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]}
                for job, target in targets.items()
            ],
        }
        config_file = self.root / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        argv = [
            PROMETHEUS,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={self.root / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.process = ManagedProcess(argv, self.root / "prometheus.log", cwd=self.root).start()
        wait_until(self._ready, 30, "Prometheus ready", 0.1)
        wait_until(lambda: self._all_up(len(targets)), 30, "every target scraped", 0.2)

    def _ready(self) -> bool:
        assert self.process is not None
        self.process.check_alive("prometheus")
        try:
            return httpx.get(self.url + "/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _all_up(self, expected: int) -> bool:
        series = self.query("up")
        return len(series) == expected and all(value == 1 for _, value in series)

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        response = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=5)
        response.raise_for_status()
        data = response.json()["data"]
        assert data["resultType"] == "vector", data
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def dispatch(api_url: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(api_url + "/dispatch_model", json=body, timeout=60, **kwargs)


def worker_metrics_env() -> dict[str, str]:
    return {"WORKER_METRICS_PORT": str(free_port()), "WORKER_METRICS_HOST": "127.0.0.1"}


def test_prometheus_scrapes_the_api_and_a_worker(
    stack_factory: StackFactory, prometheus: PrometheusServer
) -> None:
    env = worker_metrics_env()
    stack = stack_factory.start(workers=1, env=env)
    api_target = stack.api_url.removeprefix("http://")
    worker_target = f"127.0.0.1:{env['WORKER_METRICS_PORT']}"
    prometheus.start({"dispatcher-api": api_target, "dispatcher-worker": worker_target})

    for i in range(SUCCEEDED):
        assert dispatch(stack.api_url, {"model_name": "echo", "input": i}).status_code == 200
    for _ in range(UNKNOWN):
        assert dispatch(stack.api_url, {"model_name": "no-such-model"}).status_code == 404
    assert dispatch(stack.api_url, {"input": 1}).status_code == 422  # refused: no model_name

    finished = "sum by (model, status, code) (dispatcher_tasks_finished_total)"
    expected = {
        ("echo", "succeeded", "ok"): SUCCEEDED,
        ("_unknown", "failed", "model_not_found"): UNKNOWN,
    }

    def outcomes() -> dict[tuple[str, str, str], float] | None:
        found = {(m["model"], m["status"], m["code"]): v for m, v in prometheus.query(finished)}
        return found if found == expected else None

    found = wait_until(outcomes, 30, f"Prometheus to see {expected}", 0.25)
    print(f"\nPROMQL {finished}\n  -> {found}")

    def scalar(promql: str) -> float | None:
        series = prometheus.query(promql)
        return series[0][1] if len(series) == 1 else None

    def settles(promql: str, expected: float) -> None:
        # The API and the worker are scraped independently, each once a second: a series may lag
        # the other target's by one scrape, so each expectation waits for its own next scrape.
        wait_until(lambda: scalar(promql) == expected, 10, f"{promql} == {expected}", 0.25)

    requests = 'sum(dispatcher_http_requests_total{route="/dispatch_model", method="POST"})'
    settles(requests, SUCCEEDED + UNKNOWN + 1)
    settles("sum(dispatcher_tasks_submitted_total)", SUCCEEDED + UNKNOWN)
    # Sync dispatches are the interactive class (shared/priorities.py).
    settles(
        'dispatcher_tasks_submitted_total{model="echo", priority="interactive", '
        'backend="torchserve"}',
        SUCCEEDED,
    )
    settles('dispatcher_submit_rejections_total{code="invalid_request"}', 1)
    settles('sum(dispatcher_task_total_seconds_count{model="echo"})', SUCCEEDED)
    settles('sum(dispatcher_torchserve_request_duration_seconds_count{outcome="ok"})', SUCCEEDED)
    ok_calls = 'backend="torchserve", outcome="ok"'
    settles(f"sum(dispatcher_backend_request_duration_seconds_count{{{ok_calls}}})", SUCCEEDED)
    settles("dispatcher_workers_alive", 1)
    settles('dispatcher_queue_depth{queue="dispatch"}', 0)
    settles("dispatcher_redis_up", 1)
    p95 = scalar("histogram_quantile(0.95, sum by (le) (dispatcher_task_total_seconds_bucket))")
    assert p95 is not None
    assert 0 < p95 < 10
    # No raw paths, task ids or keys among the labels Prometheus stored.
    routes = {m["route"] for m, _ in prometheus.query("dispatcher_http_requests_total")}
    assert routes <= {"/dispatch_model", "/metrics", "/health"}, routes


def scrape(url: str) -> dict[str, float]:
    """`name{labels}` -> value of a /metrics page (labels sorted)."""
    text = httpx.get(url, timeout=5).text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return found


def test_queue_depth_counts_tasks_the_workers_prefetched(stack_factory: StackFactory) -> None:
    """LLEN misses what the worker holds: in flight says where those tasks are."""
    stack = stack_factory.start(workers=1, env={"WORKER_MAX_CALLS_PER_BACKEND": "2"})
    # The worker runs 2 and holds a third that waits for a slot (it fetches only while every
    # task it holds has one): 3 messages in flight, 4 tasks not started, 3 still in the list.
    tasks = 6
    for _ in range(tasks):
        accepted = dispatch(
            stack.api_url, {"model_name": "slow", "input": {"sleep": 2}}, params={"wait": 0}
        )
        assert accepted.status_code == 202

    def held() -> dict[str, float] | None:
        metrics = scrape(stack.api_url + "/metrics")
        depth = metrics["dispatcher_queue_depth{queue=dispatch}"]
        in_flight = metrics["dispatcher_tasks_in_flight"]
        return metrics if depth == tasks - 2 and in_flight == 3 else None

    metrics = wait_until(held, 10, "the worker to hold its slots' tasks and one more", 0.1)
    key = "dispatcher_tasks_submitted_total{backend=torchserve,model=slow,priority=default}"
    assert metrics[key] == tasks


def test_api_processes_report_as_one_and_the_worker_serves_every_call(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    api_dir = tmp_path / "api-metrics"
    api_dir.mkdir()
    base = stack_factory.base_env()
    stack_factory.redis_server.start()
    port = free_port()
    api = ManagedProcess(
        [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host",
         "127.0.0.1", "--port", str(port), "--workers", "2", "--no-access-log"],
        tmp_path / "api.log",
        cwd=REPO_ROOT,
        env={**os.environ, **base, "PROMETHEUS_MULTIPROC_DIR": str(api_dir)},
    )  # fmt: skip
    metrics_env = worker_metrics_env()
    worker = CeleryWorker({**base, **metrics_env}, "metrics", tmp_path / "worker.log")
    url = f"http://127.0.0.1:{port}"
    try:
        api.start()
        worker.start()
        wait_until(lambda: _answers(url + "/health"), 30, "uvicorn --workers 2", 0.1)
        requests = 40
        with httpx.Client(base_url=url, timeout=60) as http:
            for i in range(requests):
                # A new connection each time, so both API processes get some of them.
                response = http.post(
                    "/dispatch_model",
                    json={"model_name": "echo", "input": i},
                    headers={"Connection": "close"},
                )
                assert response.status_code == 200, response.text
        log = (tmp_path / "api.log").read_text()
        started = re.findall(r"Started server process \[(\d+)\]", log)
        assert len(set(started)) == 2, "uvicorn did not start two processes"
        # Whichever process answers the scrape reports the requests of both.
        for _ in range(6):
            metrics = scrape(url + "/metrics")
            key = "dispatcher_http_requests_total{method=POST,route=/dispatch_model,status=200}"
            assert metrics[key] == requests
            key = (
                "dispatcher_tasks_submitted_total{backend=torchserve,model=echo,"
                "priority=interactive}"
            )
            assert metrics[key] == requests
        worker_url = f"http://127.0.0.1:{metrics_env['WORKER_METRICS_PORT']}/metrics"
        finished = (
            "dispatcher_tasks_finished_total{backend=torchserve,code=ok,model=echo,"
            "status=succeeded}"
        )
        # Every call ran on the worker's engine, in the process that serves /metrics.
        wait_until(lambda: scrape(worker_url).get(finished) == requests, 10, finished, 0.1)
    finally:
        worker.stop()
        api.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
