"""API_WORKERS: several API processes (uvicorn --workers) on one Redis, and how they are started.

The end-to-end test runs two API processes (devstack's ApiServer, as `make run` starts them) with a
real redis-server, a Celery worker and TorchServe: every sync wait and long poll must get its own
task's answer whichever process took the request and whichever process the worker's publish woke.
"""

from __future__ import annotations

import asyncio
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from api.__main__ import parse, prepare_metrics_dir, uvicorn_command
from devstack import ApiServer, CeleryWorker
from devstack.local import LocalConfig
from tests.support.stack import StackFactory

CLIENTS = 200
SUBMITTED = "dispatcher_tasks_submitted_total"


# --- python -m api (the API image) ------------------------------------------------------------


def test_one_process_needs_no_metrics_directory() -> None:
    environ: dict[str, str] = {}
    assert prepare_metrics_dir(1, environ) is None
    assert environ == {}


def test_several_processes_get_a_fresh_metrics_directory() -> None:
    environ: dict[str, str] = {}
    directory = prepare_metrics_dir(2, environ)
    assert directory is not None
    try:
        assert environ == {"PROMETHEUS_MULTIPROC_DIR": directory}
        assert list(Path(directory).iterdir()) == []
    finally:
        Path(directory).rmdir()


def test_a_configured_metrics_directory_is_emptied_of_old_samples(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_123.db").write_bytes(b"old samples")
    (directory / "README").write_text("not ours")
    environ = {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    assert prepare_metrics_dir(2, environ) == str(directory)
    assert sorted(path.name for path in directory.iterdir()) == ["README"]


def test_the_entry_runs_uvicorn_with_the_process_count() -> None:
    command = uvicorn_command(parse(["--host", "0.0.0.0", "--port", "9000"]), workers=3)
    assert command[:4] == [sys.executable, "-m", "uvicorn", "api.main:create_app"]
    assert command[command.index("--workers") + 1] == "3"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "9000"
    assert "--factory" in command
    assert "--no-access-log" in uvicorn_command(parse(["--no-access-log"]), workers=1)


# --- make run (devstack) ----------------------------------------------------------------------


def test_make_run_reads_api_workers(tmp_path: Path) -> None:
    no_file = tmp_path / "absent.env"
    assert LocalConfig.from_env({"API_WORKERS": "3"}, no_file).api_workers == 3
    assert LocalConfig.from_env({}, no_file).api_workers == 1
    # The API's processes read the repository's .env: make run reads it too, and the environment
    # wins over it, as in shared/settings.py.
    dotenv = tmp_path / ".env"
    dotenv.write_text("API_WORKERS=2\n")
    assert LocalConfig.from_env({}, dotenv).api_workers == 2
    assert LocalConfig.from_env({"API_WORKERS": "3"}, dotenv).api_workers == 3
    assert LocalConfig.from_env({"API_WORKERS": "3"}).api_workers == 3  # the default file


@pytest.mark.parametrize("value", ["0", "-1", "two", "65"])
def test_make_run_refuses_a_bad_process_count(value: str) -> None:
    with pytest.raises(SystemExit, match="API_WORKERS"):
        LocalConfig.from_env({"API_WORKERS": value})


def test_several_api_processes_get_their_own_metrics_directory(tmp_path: Path) -> None:
    one = ApiServer({}, tmp_path / "api.log")
    assert one.metrics_dir is None
    assert "--workers" not in one.process.argv
    two = ApiServer({}, tmp_path / "api.log", workers=2)
    assert two.metrics_dir == tmp_path / "api-metrics"
    assert two.process.argv[two.process.argv.index("--workers") + 1] == "2"
    assert two.env["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "api-metrics")


# --- two API processes on the real stack ------------------------------------------------------


def _submitted_by(directory: Path, pid: int) -> float:
    """Tasks one API process counted as submitted, from its own multiprocess file."""
    path = directory / f"counter_{pid}.db"
    if not path.exists():
        return 0.0
    return sum(
        sample.value
        for metric in MultiProcessCollector.merge([str(path)])  # type: ignore[no-untyped-call]
        for sample in metric.samples
        if sample.name == SUBMITTED
    )


async def _sync_clients(url: str, inputs: list[dict[str, Any]]) -> list[httpx.Response]:
    # No keep-alive: a new connection per request, so both processes accept some of them.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post("/dispatch_model", json={"model_name": "echo", "input": value})
                for value in inputs
            )
        )


async def _long_polls(url: str, inputs: list[dict[str, Any]]) -> list[httpx.Response]:
    """Submit each input at once (202), then long-poll every task on a new connection."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        accepted = await asyncio.gather(
            *(
                client.post(
                    "/dispatch_model",
                    json={"model_name": "echo", "input": value},
                    headers={"Prefer": "respond-async"},
                )
                for value in inputs
            )
        )
        assert {response.status_code for response in accepted} == {202}
        return await asyncio.gather(
            *(
                client.get(f"/tasks/{response.json()['task_id']}", params={"wait": 30})
                for response in accepted
            )
        )


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_two_api_processes_answer_every_waiter_with_its_own_result(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    stack_factory.redis_server.start()
    env = stack_factory.base_env()
    worker = CeleryWorker(env, "apiworkers", tmp_path / "worker.log", concurrency=8)
    api = ApiServer(env, tmp_path / "api.log", workers=2)
    try:
        worker.launch()
        api.launch()
        worker.wait_ready(60)
        api.wait_ready(60)
        pids = api.server_pids()
        assert len(pids) == 2, api.log_text()
        run = uuid.uuid4().hex
        sync_inputs = [{"client": i, "run": run} for i in range(CLIENTS)]
        answers = asyncio.run(_sync_clients(api.url, sync_inputs))
        for value, response in zip(sync_inputs, answers, strict=True):
            assert response.status_code == 200, response.text
            assert response.json()["prediction_value"] == value
        poll_inputs = [{"poll": i, "run": run} for i in range(CLIENTS // 2)]
        polled = asyncio.run(_long_polls(api.url, poll_inputs))
        for value, response in zip(poll_inputs, polled, strict=True):
            assert response.status_code == 200, response.text
            body = response.json()
            assert (body["status"], body["prediction_value"]) == ("succeeded", value)
        assert api.metrics_dir is not None
        per_process = {pid: _submitted_by(api.metrics_dir, pid) for pid in pids}
        # Both processes took submissions (and so waits were served by each), and together
        # exactly one per request.
        assert all(count > 0 for count in per_process.values()), per_process
        assert sum(per_process.values()) == CLIENTS + CLIENTS // 2
    finally:
        api.stop()
        worker.stop()
    assert not re.search(r"Traceback|ERROR", api.log_text()), api.log_text()
