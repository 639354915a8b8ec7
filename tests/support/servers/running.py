"""What the server modules share: a clean environment, start-and-wait-ready, a handle to yield.

Every server reads settings from its environment over its flags or files (MLServer every
`MLSERVER_*`, llama.cpp's server `HOST`, `PORT`, `API_KEY`, KServe its own), so each starts with
only PATH, HOME, LANG and TMPDIR: nothing of the developer's or CI's environment leaks in. Each
runs as its own session (devstack's ManagedProcess) and is stopped by process group.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from devstack.processes import ManagedProcess
from tests.support.servers.venvs import Venv

HOST = "127.0.0.1"
LOG_TAIL_LINES = 60


class ServerStartError(RuntimeError):
    """A server exited or never became ready; the message ends with its log's tail."""


def clean_env(venv: Venv, home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment a server gets: its venv first on PATH, a private HOME and TMPDIR."""
    tmp = home / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": f"{venv.bin}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    }


def client(timeout: float = 30.0) -> httpx.Client:
    """An httpx client for direct calls: no proxy or .netrc from the environment."""
    return httpx.Client(timeout=timeout, trust_env=False)


@dataclass
class RunningServer:
    """A started, ready server, as the fixtures yield it."""

    kind: str  # "mlserver", "kserve", "llama.cpp"
    url: str  # base URL, no trailing slash
    model_name: str  # the model most tests call
    process: ManagedProcess
    ready_seconds: float  # from start to every readiness check answering 200
    models: tuple[str, ...] = field(default=())  # every model it serves

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return self.process.log_tail(lines)

    def check_alive(self) -> None:
        self.process.check_alive(self.kind)


def _answers_200(http: httpx.Client, url: str) -> bool:
    try:
        return http.get(url).status_code == 200
    except httpx.TransportError:
        return False


def wait_ready(process: ManagedProcess, kind: str, urls: Sequence[str], timeout: float) -> float:
    """Seconds until every URL answered 200, in order; ServerStartError if it exits or times out."""
    started = time.monotonic()
    deadline = started + timeout
    with client(timeout=5.0) as http:
        for url in urls:
            while not _answers_200(http, url):
                if not process.alive:
                    raise ServerStartError(
                        f"{kind} exited with code {process.returncode} before {url} answered; "
                        f"log {process.log_path}:\n{process.log_tail(LOG_TAIL_LINES)}"
                    )
                if time.monotonic() >= deadline:
                    raise ServerStartError(
                        f"{kind}: {url} not ready after {timeout:g} s; log {process.log_path}:\n"
                        f"{process.log_tail(LOG_TAIL_LINES)}"
                    )
                time.sleep(0.1)
    return time.monotonic() - started


@contextmanager
def serving(
    kind: str,
    argv: Sequence[str | Path],
    *,
    workdir: Path,
    env: Mapping[str, str],
    base_url: str,
    ready_paths: Sequence[str],
    model_name: str,
    models: Sequence[str] = (),
    timeout: float = 90.0,
) -> Iterator[RunningServer]:
    """Start `argv` in `workdir` (log: workdir/<kind>.log), wait for `ready_paths`, yield, stop.

    Stopped by process group (SIGTERM, SIGKILL after 10 s) however the block ends.
    """
    log_path = workdir / f"{kind.replace('.', '')}.log"
    process = ManagedProcess([str(word) for word in argv], log_path, cwd=workdir, env=env)
    process.start()
    try:
        seconds = wait_ready(process, kind, [base_url + path for path in ready_paths], timeout)
        yield RunningServer(
            kind=kind,
            url=base_url,
            model_name=model_name,
            process=process,
            ready_seconds=round(seconds, 2),
            models=tuple(models) or (model_name,),
        )
    finally:
        process.stop()
