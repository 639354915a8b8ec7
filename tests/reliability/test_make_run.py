"""`make run` keeps serving: its processes are SIGKILLed under load and no task is lost.

`python -m devstack run` runs as `make run` starts it (on free ports, in a temporary directory):
its banner lists every log and every metrics URL, each of which answers (each worker on its own
port, on loopback, counting the tasks it ran); its Celery worker and then redis-server are
SIGKILLed with 150 tasks queued and running, then the API and TorchServe; every task still
succeeds, the supervisor stays up and restarts each one, and on SIGTERM it stops everything it
started and reports the restart counts.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from devstack import PAYLOAD_MODULE, REPO_ROOT, ManagedProcess, archive_model
from devstack.processes import free_port, wait_until
from tests.support.faults import child_pids, records, running, submit, wait_terminal
from tests.support.stack import TEST_MODELS_DIR

pytestmark = pytest.mark.e2e

TASKS = 150
SLOW = {"model_name": "slow", "input": {"sleep": 0.1}}  # 2 model workers: ~8 s of work for 150
# Short broker leases, so a dead worker's tasks come back in seconds (make run's default: 60 s).
FAST_REDELIVERY = {
    "BROKER_VISIBILITY_TIMEOUT": "4",
    "WORKER_HEARTBEAT_INTERVAL": "1",
    "DISPATCH_DEFAULT_TIMEOUT": "300",
}
# What identifies each supervised process among the supervisor's children (their command lines).
COMMANDS = {
    "redis-server": "redis-server",
    "TorchServe": "torchserve",
    "Celery worker": "-Q dispatch.interactive,dispatch,dispatch.batch ",
    "interactive worker": "-Q dispatch.interactive -n",
    "webhook consumer": "-Q webhooks",
    "API server": "uvicorn",
}
# The banner's metrics lines: every dispatcher process that serves /metrics, and TorchServe.
METRICS = ("API server", "Celery worker", "interactive worker", "webhook consumer", "TorchServe")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:  # gone meanwhile
        return ""


@dataclass
class MakeRun:
    """`python -m devstack run` on free ports in a temporary directory, and what was done to it."""

    process: ManagedProcess
    api_url: str
    management_url: str
    redis_url: str
    workdir: Path
    metrics_ports: dict[str, int]  # what DEVSTACK_METRICS_PORTS and the TorchServe ports gave
    kills: Counter[str] = field(default_factory=Counter)
    seen: set[int] = field(default_factory=set)  # every child pid: none may outlive the run

    def output(self) -> str:
        return self.process.log_text()

    def child(self, name: str) -> int:
        """The pid of the supervised process `name` (a direct child of the supervisor)."""
        children = child_pids(self.process.pid)
        self.seen.update(children)
        pids = [pid for pid in children if COMMANDS[name] in _cmdline(pid)]
        assert len(pids) == 1, f"{name}: {[_cmdline(pid) for pid in pids]}\n{self.output()}"
        return pids[0]

    def kill(self, name: str, pid: int | None = None) -> None:
        """SIGKILL `name` (or `pid`, one of its processes); wait until it is back."""
        os.kill(pid if pid is not None else self.child(name), signal.SIGKILL)
        self.kills[name] += 1
        wait_until(
            lambda: (
                self.output().count(f"{name} is back") >= self.kills[name] or not self.process.alive
            ),
            90,
            f"{name} to be restarted",
        )
        assert self.process.alive, self.output()
        self.child(name)


@pytest.fixture(scope="module")
def make_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeRun]:
    workdir = tmp_path_factory.mktemp("make-run")
    # The test model sits in make run's model store, registered once the stack is up.
    archive_model(
        "slow", TEST_MODELS_DIR / "slow.py", workdir / "model-store", extra_files=[PAYLOAD_MODULE]
    )
    api_port, redis_port = free_port(), free_port()
    ts_ports = [free_port() for _ in range(5)]  # gRPC too: no port chosen in another process
    worker_ports = [free_port() for _ in range(3)]  # worker, interactive worker, webhooks
    ours = {"REDIS_URL", "TORCHSERVE_URL", "PORT"}  # make run must start its own
    env = {
        **{key: value for key, value in os.environ.items() if key not in ours},
        **FAST_REDELIVERY,
        "PYTHONUNBUFFERED": "1",
        "PORT": str(api_port),
        "DEVSTACK_WORKDIR": str(workdir),
        "DEVSTACK_REDIS_PORT": str(redis_port),
        "DEVSTACK_TORCHSERVE_PORTS": ",".join(map(str, ts_ports)),
        "DEVSTACK_METRICS_PORTS": ",".join(map(str, worker_ports)),
    }
    # SIGTERM to the supervisor alone, as a terminal's Ctrl-C or a service manager would send.
    process = ManagedProcess(
        [sys.executable, "-m", "devstack", "run"],
        workdir / "make-run.log",
        cwd=REPO_ROOT,
        env=env,
        terminate_group=False,
    ).start()
    run = MakeRun(
        process,
        api_url=f"http://127.0.0.1:{api_port}",
        management_url=f"http://127.0.0.1:{ts_ports[1]}",
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        workdir=workdir,
        metrics_ports={
            "API server": api_port,
            **dict(zip(METRICS[1:4], worker_ports, strict=True)),
            "TorchServe": ts_ports[2],
        },
    )
    try:

        def ready() -> bool:
            process.check_alive(f"make run:\n{run.output()}")
            try:
                return httpx.get(run.api_url + "/ready", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 180, "make run to be ready", 0.2)
        registered = httpx.post(
            run.management_url + "/models",
            params={"url": "slow.mar", "initial_workers": 2, "synchronous": "true"},
            timeout=120,
        )
        assert registered.status_code == 200, registered.text
        for name in COMMANDS:
            run.child(name)
        yield run
    finally:
        process.stop(timeout=90)
        for pid in run.seen:  # only if the supervisor failed to: each child leads its group
            if running(pid):
                os.killpg(pid, signal.SIGKILL)


def _banner_section(output: str, title: str) -> dict[str, str]:
    """The `  name   value` lines under a banner heading, up to the next blank line."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    entries = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        match = re.fullmatch(r"  (\S.*?) {2,}(\S+)", line)
        assert match, f"not a banner entry: {line!r}"
        entries[match[1]] = match[2]
    return entries


def _listening_addresses(port: int) -> set[str]:
    """The IPv4/IPv6 addresses (kernel hex) of sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def _scrape(url: str) -> dict[str, float]:
    """GET a /metrics page; it must be Prometheus text. {sample name: sum over its labels}."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, (url, response.text[:500])
    assert response.headers["content-type"].startswith("text/plain"), url
    assert "# TYPE " in response.text, url
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    assert totals, url
    return totals


def test_the_banner_lists_every_log_and_metrics_url_and_each_answers(make_run: MakeRun) -> None:
    wait_until(lambda: "Metrics (" in make_run.output(), 30, "the banner")
    output = make_run.output()
    logs = _banner_section(output, "Logs:")
    # Each supervised process's output, and the files TorchServe writes itself.
    assert set(logs) == {*COMMANDS, "TorchServe's own"}, logs
    for name, path in logs.items():
        assert Path(path).is_relative_to(make_run.workdir), f"{name}: {path}"
        if name in COMMANDS:
            assert Path(path).is_file(), f"{name}: {path}"
    own = {file.name for file in Path(logs["TorchServe's own"]).iterdir()}
    assert {"ts_log.log", "model_log.log", "access_log.log"} <= own, own
    metrics = _banner_section(output, "Metrics (")
    assert set(metrics) == set(METRICS), metrics
    for name, url in metrics.items():
        assert url == f"http://127.0.0.1:{make_run.metrics_ports[name]}/metrics", (name, url)
        _scrape(url)
    # Each worker process on its own port, on loopback only; none lost the race for one.
    for name in ("Celery worker", "interactive worker", "webhook consumer"):
        assert _listening_addresses(make_run.metrics_ports[name]) == {"0100007F"}, name
    for name in COMMANDS:
        assert "metrics not served" not in Path(logs[name]).read_text(), name
    assert "dispatcher_webhook_deliveries_total" in httpx.get(metrics["webhook consumer"]).text
    # Both prediction workers take interactive work: together they count every task they ran.
    finished = "dispatcher_tasks_finished_total"
    workers = ("Celery worker", "interactive worker")
    before = {name: _scrape(metrics[name]).get(finished, 0.0) for name in workers}
    with httpx.Client(base_url=make_run.api_url, timeout=60) as http:
        body = {"model_name": "slow", "input": {"sleep": 0.05}, "priority": "interactive"}
        ids = [submit(http, body) for _ in range(40)]
    client = redis.Redis.from_url(make_run.redis_url, socket_timeout=5, decode_responses=False)
    try:
        final = wait_terminal(client, ids, timeout=120)
    finally:
        client.close()
    assert Counter(fields["status"] for fields in final.values()) == {"succeeded": 40}
    after = {name: _scrape(metrics[name]).get(finished, 0.0) for name in workers}
    ran = {name: after[name] - before[name] for name in workers}
    print(f"\nMETRICS: tasks finished per worker {ran}")
    assert sum(ran.values()) == 40, ran


def _submit_and_kill(make_run: MakeRun, name: str) -> dict[str, str]:
    """150 slow tasks; SIGKILL `name` once 20 are done; every task's final status."""
    with httpx.Client(base_url=make_run.api_url, timeout=10) as http:
        ids = [submit(http, SLOW) for _ in range(TASKS)]
    client = redis.Redis.from_url(make_run.redis_url, socket_timeout=5, decode_responses=False)
    try:

        def in_flight() -> bool:
            statuses = Counter(f.get("status") for f in records(client, ids).values())
            return statuses["succeeded"] >= 20 and statuses["running"] > 0

        wait_until(in_flight, 60, "tasks running")
        at_kill = Counter(f.get("status") for f in records(client, ids).values())
        killed = time.monotonic()
        make_run.kill(name)
        back = time.monotonic() - killed
        final = wait_terminal(client, ids, timeout=180)
        done = time.monotonic() - killed
    finally:
        client.close()
    statuses = {task_id: fields["status"] for task_id, fields in final.items()}
    print(
        f"\nSIGKILL {name}: at the kill {dict(at_kill)}; back (ready) after {back:.1f} s; "
        f"all {TASKS} terminal {done:.1f} s after the kill: {dict(Counter(statuses.values()))}"
    )
    return statuses


def test_sigkill_worker_with_150_tasks_in_flight_loses_none(make_run: MakeRun) -> None:
    statuses = _submit_and_kill(make_run, "Celery worker")
    assert Counter(statuses.values()) == {"succeeded": TASKS}
    assert make_run.process.alive
    assert "Celery worker (pid" in make_run.output()
    assert "killed by SIGKILL" in make_run.output()


def test_sigkill_redis_with_150_tasks_in_flight_loses_none(make_run: MakeRun) -> None:
    client = redis.Redis.from_url(make_run.redis_url, decode_responses=True)
    # appendfsync always: what Redis acknowledged is on disk, so the restart replays it all.
    assert client.config_get("appendfsync") == {"appendfsync": "always"}
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    client.close()
    statuses = _submit_and_kill(make_run, "redis-server")
    assert Counter(statuses.values()) == {"succeeded": TASKS}
    assert make_run.process.alive
    assert "redis-server is back" in make_run.output()


def test_the_api_and_torchserve_come_back_too(make_run: MakeRun) -> None:
    make_run.kill("API server")
    # TorchServe's Java frontend (a child of the `torchserve` CLI the supervisor started).
    java = [pid for pid in child_pids(make_run.child("TorchServe")) if "java" in _cmdline(pid)]
    assert len(java) == 1
    make_run.kill("TorchServe", java[0])
    body = {"model_name": "echo", "input": {"after": "restarts"}}
    answer = httpx.post(make_run.api_url + "/dispatch_model", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["prediction_value"] == {"after": "restarts"}


def test_sigterm_stops_everything_and_reports_the_restarts(make_run: MakeRun) -> None:
    for name in COMMANDS:
        make_run.child(name)
    os.kill(make_run.process.pid, signal.SIGTERM)
    wait_until(lambda: not make_run.process.alive, 90, "make run to stop")
    output = make_run.output()
    assert make_run.process.returncode == 0, output
    summary = next(line for line in output.splitlines() if line.startswith("restarts: "))
    counts = dict(item.rsplit(" ", 1) for item in summary.removeprefix("restarts: ").split(", "))
    assert set(COMMANDS) <= set(counts), summary
    for name, kills in make_run.kills.items():
        # A Redis restart may take the worker with it; it is restarted too.
        assert int(counts[name]) >= kills, summary
    print(f"\nMAKE RUN: kills={dict(make_run.kills)} {summary}")
    print(
        "\n".join(line for line in output.splitlines() if "stopped:" in line or "is back" in line)
    )
    leftovers = [pid for pid in make_run.seen if running(pid)]
    assert not leftovers, [_cmdline(pid) for pid in leftovers]
