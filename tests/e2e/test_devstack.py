"""The local stack's building blocks against the real programs: processes, Redis, the services
on stand-in apps, `make run`'s metrics ports (TorchServe and the models have their own file)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import redis

from devstack import (
    ApiServer,
    CeleryWorker,
    ManagedProcess,
    RedisServer,
    start_stack,
    wait_until,
)
from devstack.local import DEFAULT_METRICS_PORTS, LocalConfig, metrics_env
from devstack.processes import free_port
from tests.support.faults import running
from tests.support.stack import StackFactory

FAKES_WORKER_APP = "tests.support.devstack_fakes"
FAKES_API_APP = "tests.support.devstack_fakes:create_app"


# --- processes ---------------------------------------------------------------------------------


def test_wait_until_returns_the_value_and_names_what_timed_out() -> None:
    assert wait_until(lambda: 42, 1, "the answer") == 42
    with pytest.raises(TimeoutError, match="the impossible"):
        wait_until(lambda: False, 0.2, "the impossible")


def test_free_port_can_be_bound() -> None:
    port = free_port()
    assert 1024 <= port <= 65535


def test_free_port_never_hands_out_a_port_twice() -> None:
    # This machine kind's kernel gives consecutive bind(0) probes the same port.
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50


def test_managed_process_logs_output(tmp_path: Path) -> None:
    process = ManagedProcess(["sh", "-c", "echo out; echo err >&2"], tmp_path / "p.log").start()
    wait_until(lambda: not process.alive, 5, "sh to exit")
    process.stop()
    assert process.log_text().splitlines() == ["out", "err"]
    assert process.returncode == 0


def test_stop_ends_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    with ManagedProcess(["sh", "-c", script], tmp_path / "p.log") as process:
        written = wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 5, "pid")
        child = int(written)
        assert running(child)
    assert not process.alive
    assert not running(child)


def test_stop_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    process = ManagedProcess(["sh", "-c", "trap '' TERM; sleep 60"], tmp_path / "p.log").start()
    time.sleep(0.2)  # let the shell install the trap
    began = time.monotonic()
    process.stop(timeout=0.5)
    assert not process.alive
    assert 0.5 <= time.monotonic() - began < 5
    process.stop()  # a second stop is harmless


def test_managed_process_fresh_runs_the_same_command_again(tmp_path: Path) -> None:
    first = ManagedProcess(["sh", "-c", "echo run"], tmp_path / "p.log", cwd=tmp_path).start()
    wait_until(lambda: not first.alive, 5, "sh to exit")
    with pytest.raises(RuntimeError, match="started already"):
        first.start()
    second = first.fresh()
    assert (second.argv, second.cwd, second.started) == (first.argv, tmp_path, False)
    second.start()
    wait_until(lambda: not second.alive, 5, "sh to exit again")
    first.stop()
    second.stop()
    assert second.log_text().splitlines() == ["run", "run"]  # one log, appended
    assert second.run_log_text() == "run\n"


# --- Redis -------------------------------------------------------------------------------------


def test_redis_server_answers_and_stops(tmp_path: Path) -> None:
    with RedisServer(tmp_path, appendonly=False) as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.close()
    assert not server.alive


def test_redis_restart_keeps_data_in_the_append_only_file(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        client = server.client()
        client.rpush("queue", "a", "b", "c")
        pid = server.pid
        server.restart()
        assert server.pid != pid
        assert client.lrange("queue", 0, -1) == [b"a", b"b", b"c"]  # reconnects, same port
        server.kill()
        assert not server.alive
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()
        assert client.llen("queue") == 3
        client.close()


def test_redis_appendfsync_always_and_a_restart_after_sigkill(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="appendfsync"):
        RedisServer(tmp_path, appendfsync="sometimes")
    with RedisServer(tmp_path, appendfsync="always") as server:
        client = server.client(decode_responses=True)
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        client.rpush("queue", *range(100))
        server.kill()  # no shutdown flush: only what was fsynced survives
        port = server.port
        server.start()
        assert server.port == port
        assert client.llen("queue") == 100
        client.close()


def test_redis_password(tmp_path: Path) -> None:
    with RedisServer(tmp_path, password="s3cret") as server:
        assert server.url == f"redis://:s3cret@127.0.0.1:{server.port}/0"
        assert server.client().ping()
        # from_url: a plain redis.Redis(...) retries 10 times with backoff (redis-py 8), ~4 s.
        anonymous = redis.Redis.from_url(f"redis://127.0.0.1:{server.port}/0")
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        anonymous.close()


# --- dispatcher services, on stand-in apps ------------------------------------------------------


def test_celery_worker_reports_ready_and_stops(redis_server: RedisServer, tmp_path: Path) -> None:
    env = {"REDIS_URL": redis_server.url}
    worker = CeleryWorker(env, "fake", tmp_path / "worker.log", app=FAKES_WORKER_APP)
    with worker:
        assert worker.alive
        assert "ready." in worker.log_text()
        assert "fake@" in worker.log_text()
    assert not worker.alive


def test_a_dead_service_starts_again_on_the_same_port(tmp_path: Path) -> None:
    with ApiServer({}, tmp_path / "api.log", app=FAKES_API_APP) as api:
        first = api.pid
        with pytest.raises(RuntimeError, match="running already"):
            api.start()
        api.process.popen.kill()  # the server alone dies, as a crash would
        wait_until(lambda: not api.alive, 5, "the API to die")
        assert api.returncode == -9
        api.start()
        assert api.pid != first
        assert httpx.get(f"{api.url}/health").status_code == 200
    assert not api.alive


def test_a_restarted_celery_worker_waits_for_its_own_ready_line(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    env = {"REDIS_URL": redis_server.url}
    with CeleryWorker(env, "again", tmp_path / "worker.log", app=FAKES_WORKER_APP) as worker:
        worker.kill()
        worker.start()  # the first run's "ready." is in the same log: it must not count
        assert worker.alive
        assert "ready." in worker.process.run_log_text()
        assert worker.log_text().count("ready.") == 2


def test_api_server_health_and_stop(tmp_path: Path) -> None:
    with ApiServer({}, tmp_path / "api.log", app=FAKES_API_APP) as api:
        assert httpx.get(f"{api.url}/health").json() == {"status": "ok"}
    assert not api.alive


def test_start_stack_starts_and_stops_everything(redis_server: RedisServer, tmp_path: Path) -> None:
    env = {"REDIS_URL": redis_server.url}
    with start_stack(
        env, tmp_path, workers=2, worker_app=FAKES_WORKER_APP, api_app=FAKES_API_APP
    ) as stack:
        assert httpx.get(f"{stack.api_url}/health").status_code == 200
        assert [worker.name for worker in stack.workers] == ["worker1", "worker2"]
        assert [consumer.name for consumer in stack.webhook_consumers] == ["webhooks1"]
        assert all(worker.alive for worker in [*stack.workers, *stack.webhook_consumers])
        assert stack.logs().count("ready.") == 3  # each worker's and the webhook consumer's
    assert not stack.api.alive
    assert not any(worker.alive for worker in [*stack.workers, *stack.webhook_consumers])


def test_make_run_gives_each_worker_process_its_own_metrics_port() -> None:
    assert LocalConfig.from_env({}).metrics_ports == DEFAULT_METRICS_PORTS == (9808, 9809, 9810)
    config = LocalConfig.from_env({"DEVSTACK_METRICS_PORTS": "9100,9101,9102"})
    assert config.metrics_ports == (9100, 9101, 9102)
    for bad in ("9100,9101", "9100,9100,9101", "9100,0,9101", "a,b,c"):
        with pytest.raises(SystemExit, match="DEVSTACK_METRICS_PORTS"):
            LocalConfig.from_env({"DEVSTACK_METRICS_PORTS": bad})
    env = metrics_env({"REDIS_URL": "redis://x"}, "WORKER_METRICS_PORT", 9100)
    assert env == {
        "REDIS_URL": "redis://x",
        "WORKER_METRICS_PORT": "9100",
        "WORKER_METRICS_HOST": "127.0.0.1",
    }


def test_make_runs_workers_each_serve_their_own_metrics(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The worker, the interactive worker and the webhook consumer as make run starts them
    (the real Celery apps): each answers /metrics on its own loopback port."""
    env = {"REDIS_URL": redis_server.url}
    ports = [free_port() for _ in range(3)]
    workers = [
        CeleryWorker(metrics_env(env, "WORKER_METRICS_PORT", ports[0]), "m1", tmp_path / "w.log"),
        CeleryWorker.interactive(
            metrics_env(env, "WORKER_METRICS_PORT", ports[1]), "m2", tmp_path / "i.log"
        ),
        CeleryWorker.webhook_consumer(
            metrics_env(env, "WEBHOOK_METRICS_PORT", ports[2]), tmp_path / "h.log", "m3"
        ),
    ]
    try:
        for worker in workers:
            worker.launch()
        for worker in workers:
            worker.wait_ready(60)
        families = {
            "m1": "dispatcher_tasks_finished_total",
            "m2": "dispatcher_tasks_finished_total",
            "m3": "dispatcher_webhook_deliveries_total",
        }
        for worker, port in zip(workers, ports, strict=True):
            url = f"http://127.0.0.1:{port}/metrics"
            page = wait_until(lambda url=url: _metrics_page(url), 30, f"{worker.name} metrics")
            assert f"# TYPE {families[worker.name]} counter" in page, worker.name
            assert "metrics not served" not in worker.log_text(), worker.log_text()
    finally:
        for worker in workers:
            worker.stop()


def _metrics_page(url: str) -> str | None:
    try:
        response = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


@pytest.mark.e2e
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_worker_stop_is_a_warm_shutdown(stack_factory: StackFactory, pool: str) -> None:
    # SIGTERM reaches the worker's main process only: prefork children would die mid-task.
    stack = stack_factory.start(workers=1, concurrency=1, pool=pool)
    with httpx.Client(base_url=stack.api_url, timeout=10) as http:
        body = {"model_name": "slow", "input": {"sleep": 2}}
        status_url = http.post(
            "/dispatch_model", json=body, headers={"Prefer": "respond-async"}
        ).json()["status_url"]
        wait_until(lambda: http.get(status_url).json()["status"] == "running", 10, "task start")
        stack.workers[0].stop()
        assert http.get(status_url).json()["status"] == "succeeded"
    assert "WorkerLostError" not in stack.logs()
