"""`python -m devstack run` (what `make run` runs): the whole stack on this machine until Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Protocol

from devstack.models import REPO_ROOT, archive_demo_models
from devstack.redis import RedisServer
from devstack.services import ApiServer, CeleryWorker
from devstack.torchserve import TorchServe

WORKDIR = REPO_ROOT / ".local"
TORCHSERVE_PORTS = (8080, 8081, 8082)
DEFAULT_API_PORT = 8000


@dataclass
class _Running:
    """One started process, for supervision: its name, liveness check and log file."""

    name: str
    alive: Callable[[], bool]
    log_path: Path


class _Server(Protocol):
    @property
    def alive(self) -> bool: ...

    @property
    def log_path(self) -> Path: ...

    def start(self) -> object: ...

    def stop(self) -> None: ...


def _launch(stack: ExitStack, running: list[_Running], name: str, server: _Server) -> None:
    """Start `server` (stopped when `stack` closes, even if starting fails); supervise it."""
    stack.callback(server.stop)
    server.start()
    running.append(_Running(name, lambda: server.alive, server.log_path))


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _require_free(port: int, hint: str) -> None:
    if _port_in_use(port):
        raise SystemExit(f"127.0.0.1:{port} is in use already; {hint}")


def _api_port() -> int:
    return int(os.environ.get("PORT", DEFAULT_API_PORT))


def _check_ports() -> None:
    """Fail before starting anything if a fixed port is taken (e.g. by a previous run)."""
    if not os.environ.get("TORCHSERVE_URL"):
        for port in TORCHSERVE_PORTS:
            _require_free(port, "stop what listens there, or set TORCHSERVE_URL to use it")
    _require_free(_api_port(), "stop what listens there, or set PORT to use another port")


def _start_redis(stack: ExitStack, running: list[_Running]) -> str:
    url = os.environ.get("REDIS_URL")
    if url:
        print(f"Using Redis at {url} (REDIS_URL)")
        return url
    # A fixed data directory: the append-only file keeps queued tasks from one run to the next.
    server = RedisServer(WORKDIR / "redis")
    print(f"Starting redis-server on port {server.port} ...", flush=True)
    _launch(stack, running, "redis-server", server)
    return server.url


def _start_torchserve(stack: ExitStack, running: list[_Running]) -> str:
    url = os.environ.get("TORCHSERVE_URL")
    if url:
        print(f"Using TorchServe at {url} (TORCHSERVE_URL)")
        return url
    store = WORKDIR / "model-store"
    models = archive_demo_models(store)
    server = TorchServe(WORKDIR / "torchserve", store, models, ports=TORCHSERVE_PORTS)
    print(f"Starting TorchServe with {', '.join(models)} (takes a few seconds) ...", flush=True)
    _launch(stack, running, "TorchServe", server)
    print(f"TorchServe ready after {server.start_seconds:.1f} s")
    return server.inference_url


def _start_dispatcher(stack: ExitStack, running: list[_Running], env: dict[str, str]) -> str:
    logs = WORKDIR / "logs"
    worker = CeleryWorker(env, "local", logs / "worker.log")
    print("Starting the Celery worker ...", flush=True)
    _launch(stack, running, "Celery worker", worker)
    api = ApiServer(env, logs / "api.log", _api_port())
    print(f"Starting the API on port {api.port} ...", flush=True)
    _launch(stack, running, "API server", api)
    return api.url


def _banner(api_url: str, running: list[_Running]) -> str:
    logs = "\n".join(f"  {item.name:<14} {item.log_path}" for item in running)
    return f"""
The dispatcher is up at {api_url}  (Ctrl-C stops everything)

Logs:
{logs}

Try:
  # synchronous: waits for the prediction
  curl -s {api_url}/dispatch_model -H 'content-type: application/json' \\
    -d '{{"model_name":"echo","input":{{"hello":"world"}}}}'
  curl -s {api_url}/dispatch_model -H 'content-type: application/json' \\
    -d '{{"model_name":"linear","input":{{"inputs":[[1,2,3]]}}}}'

  # asynchronous: answers 202 with a task id at once
  curl -s {api_url}/dispatch_model -H 'content-type: application/json' \\
    -H 'Prefer: respond-async' -d '{{"model_name":"echo","input":{{"hello":"later"}}}}'
  curl -s {api_url}/tasks/<task_id>

  # the API's documentation, in a browser
  {api_url}/docs
"""


def _supervise(running: list[_Running]) -> int:
    """Block until a process dies (exit 1) or Ctrl-C / SIGTERM arrives (KeyboardInterrupt)."""
    while True:
        for item in running:
            if not item.alive():
                print(f"\n{item.name} exited; see {item.log_path}. Stopping the rest.")
                return 1
        time.sleep(1)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run() -> int:
    """Start Redis, TorchServe, a worker and the API; stop them all (reverse order) on exit."""
    # SIGTERM (e.g. from a process manager) shuts down like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    _check_ports()
    running: list[_Running] = []
    with ExitStack() as stack:
        try:
            env = {
                "REDIS_URL": _start_redis(stack, running),
                "TORCHSERVE_URL": _start_torchserve(stack, running),
            }
            api_url = _start_dispatcher(stack, running, env)
            print(_banner(api_url, running), flush=True)
            return _supervise(running)
        except KeyboardInterrupt:
            print("\nStopping ...", flush=True)
            return 0
        except (TimeoutError, RuntimeError, FileNotFoundError) as exc:
            print(f"\nCould not start the stack: {exc}\nStopping what did start ...", flush=True)
            return 1
        finally:
            # A second Ctrl-C must not cut the teardown short and leave servers running.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
