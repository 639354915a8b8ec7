"""The supervisor of `make run`: its backoff policy, and its watcher on tiny shell processes.

tests/test_make_run.py runs the real thing (`python -m devstack run`) and SIGKILLs its processes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Self

import pytest

from devstack import REPO_ROOT, ManagedProcess, ProcessServer
from devstack.local import DEFAULT_TORCHSERVE_PORTS, LocalConfig
from devstack.processes import wait_until
from devstack.supervisor import Backoff, Supervisor, describe_exit

# --- the backoff policy ------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    backoff = Backoff()
    delays = [backoff.delay(uptime=1) for _ in range(9)]
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_backoff_starts_over_after_a_long_enough_run() -> None:
    backoff = Backoff(initial=1, maximum=10, reset_after=60)
    assert [backoff.delay(5), backoff.delay(5), backoff.delay(59.9)] == [1, 2, 4]
    assert backoff.delay(60) == 1  # up a minute: a new failure, not the same crash loop
    assert backoff.delay(0) == 2


@pytest.mark.parametrize(
    ("initial", "maximum", "factor"), [(0, 1, 2), (2, 1, 2), (1, 2, 0.5), (-1, 1, 2)]
)
def test_backoff_rejects_nonsense(initial: float, maximum: float, factor: float) -> None:
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial=initial, maximum=maximum, factor=factor)


def test_describe_exit() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(None) == "exit status unknown"


def test_local_config_from_env(tmp_path: Path) -> None:
    default = LocalConfig.from_env({})
    assert default.api_port == 8000
    assert default.torchserve_ports == DEFAULT_TORCHSERVE_PORTS
    assert default.workdir == REPO_ROOT / ".local"
    assert default.redis_port is None
    config = LocalConfig.from_env(
        {
            "DEVSTACK_WORKDIR": str(tmp_path),
            "PORT": "9000",
            "DEVSTACK_REDIS_PORT": "9001",
            "DEVSTACK_TORCHSERVE_PORTS": "9002,9003,9004",
        }
    )
    assert (config.workdir, config.api_port, config.redis_port) == (tmp_path, 9000, 9001)
    assert config.torchserve_ports == (9002, 9003, 9004)
    assert config.torchserve_grpc_ports is None
    grpc = LocalConfig.from_env({"DEVSTACK_TORCHSERVE_PORTS": "1,2,3,4,5"}).torchserve_grpc_ports
    assert grpc == (4, 5)
    with pytest.raises(SystemExit, match="DEVSTACK_TORCHSERVE_PORTS"):
        LocalConfig.from_env({"DEVSTACK_TORCHSERVE_PORTS": "1,2"})


# --- the watcher, on small real processes -------------------------------------------------------


class CrashLooping(ProcessServer):
    """A shell process that exits with code 3 on its first `failures` runs, then stays up."""

    program = "crasher"

    def __init__(self, workdir: Path, failures: int) -> None:
        super().__init__()
        self.log_path = workdir / "crasher.log"
        self.runs_file = workdir / "runs"
        self.script = (
            f"n=$(($(cat {self.runs_file} 2>/dev/null || echo 0) + 1)); "
            f'echo $n > {self.runs_file}; echo "run $n"; [ $n -le {failures} ] && exit 3; '
            "exec sleep 60"
        )

    @property
    def runs(self) -> int:
        try:
            return int(self.runs_file.read_text())
        except (FileNotFoundError, ValueError):  # not written yet, or being written
            return 0

    def start(self) -> Self:
        if self._process is not None:
            self._process.stop()
        self._process = ManagedProcess(["sh", "-c", self.script], self.log_path).start()
        return self


def _fast_backoff() -> Backoff:
    return Backoff(initial=0.01, maximum=0.04, reset_after=60)


def _restart_delays(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The `restart N in D s` delays logged, in order."""
    messages = [record.getMessage() for record in caplog.records]
    return [m.split(" in ")[1].split(" s ")[0] for m in messages if "stopped:" in m]


def test_a_dead_process_is_restarted_with_growing_delays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="devstack.supervisor")
    server = CrashLooping(tmp_path, failures=4)
    supervisor = Supervisor(backoff=_fast_backoff, poll_interval=0.01)
    try:
        supervisor.start("crasher", server)
        wait_until(lambda: server.runs == 5 and server.alive, 10, "the fifth run to stay up")
        wait_until(lambda: "crasher is back" in caplog.text, 5, "the last restart's log line")
        pid = server.pid
    finally:
        supervisor.stop(timeout=2)
    assert supervisor.restarts() == {"crasher": 4}
    assert supervisor.summary() == "restarts: crasher 4"
    assert _restart_delays(caplog) == ["0.01", "0.02", "0.04", "0.04"]
    assert "crasher (pid" in caplog.text
    assert "exit code 3" in caplog.text
    assert not server.alive
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_the_backoff_resets_after_a_long_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With a clock that says every run lasted 100 s, every restart is immediate again."""
    caplog.set_level(logging.INFO, logger="devstack.supervisor")
    ticks = iter(range(0, 100_000, 100))
    server = CrashLooping(tmp_path, failures=3)
    supervisor = Supervisor(backoff=_fast_backoff, clock=lambda: next(ticks), poll_interval=0.01)
    try:
        supervisor.start("crasher", server)
        wait_until(lambda: server.runs == 4 and server.alive, 10, "the fourth run to stay up")
    finally:
        supervisor.stop(timeout=2)
    assert _restart_delays(caplog) == ["0.01", "0.01", "0.01"]


def test_stop_does_not_wait_for_a_pending_restart(tmp_path: Path) -> None:
    server = CrashLooping(tmp_path, failures=100)
    supervisor = Supervisor(backoff=lambda: Backoff(initial=30), poll_interval=0.01)
    supervisor.start("crasher", server)
    wait_until(lambda: supervisor.restarts()["crasher"] == 1, 5, "the first death")
    began = time.monotonic()
    supervisor.stop(timeout=2)
    assert time.monotonic() - began < 2  # not the 30 s of the pending restart
    assert server.runs == 1
    assert not supervisor.children[0].thread.is_alive()


def test_a_restart_that_is_not_ready_is_stopped_and_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A start that fails but leaves its process running must not count as up."""

    class NotReadyTwice(CrashLooping):
        starts = 0

        def start(self) -> Self:
            super().start()
            self.starts += 1
            if self.starts in (2, 3):  # the process runs on (it would sleep 60 s), not ready
                raise TimeoutError("not ready after 0 s")
            return self

    caplog.set_level(logging.INFO, logger="devstack.supervisor")
    server = NotReadyTwice(tmp_path, failures=1)
    supervisor = Supervisor(backoff=_fast_backoff, poll_interval=0.01)
    try:
        supervisor.start("slow", server)
        wait_until(lambda: "slow is back" in caplog.text, 10, "the fourth run to be taken as up")
        assert server.alive
    finally:
        supervisor.stop(timeout=2)
    assert server.starts == 4
    assert caplog.text.count("slow did not come back: not ready after 0 s") == 2
    assert supervisor.restarts() == {"slow": 3}


def test_a_process_that_cannot_start_stops_the_supervisor_start(tmp_path: Path) -> None:
    class Broken(CrashLooping):
        def start(self) -> Self:
            super().start()
            raise RuntimeError("not ready")

    server = Broken(tmp_path, failures=0)
    supervisor = Supervisor(backoff=_fast_backoff)
    with pytest.raises(RuntimeError, match="not ready"):
        supervisor.start("broken", server)
    supervisor.stop(timeout=2)
    assert not server.alive  # the half-started process was stopped all the same
    with pytest.raises(RuntimeError, match="stopping"):
        supervisor.start("late", CrashLooping(tmp_path, failures=0))
