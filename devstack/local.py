"""`python -m devstack run` (what `make run` runs): the whole stack on this machine until Ctrl-C.

The embedded single-machine deployment: a supervisor (devstack/supervisor.py) restarts any of
redis-server, TorchServe, the Celery worker and the API that dies, and Ctrl-C or SIGTERM stops
everything it started. Knobs (the tests use them to run it on free ports in a temporary
directory): `PORT` (API, default 8000), `DEVSTACK_WORKDIR` (default `.local/`),
`DEVSTACK_REDIS_PORT` (default: a free port), `DEVSTACK_TORCHSERVE_PORTS` (inference, management,
metrics, optionally gRPC inference and management; default `8080,8081,8082` and free gRPC ports),
`DEVSTACK_METRICS_PORTS` (the Prometheus `/metrics` of the worker, the interactive worker and the
webhook consumer, one port each: default `9808,9809,9810`); `REDIS_URL` / `TORCHSERVE_URL` use
servers of your own instead. The banner lists every log file and every metrics URL.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit, urlunsplit

from dotenv import dotenv_values
from pydantic import TypeAdapter

from devstack.models import REPO_ROOT, archive_demo_models
from devstack.redis import RedisServer
from devstack.services import ApiServer, CeleryWorker
from devstack.supervisor import Supervisor
from devstack.torchserve import TorchServe
from shared.redis_url import is_sentinel_url
from shared.settings import ApiWorkers

DEFAULT_WORKDIR = REPO_ROOT / ".local"
DEFAULT_TORCHSERVE_PORTS = (8080, 8081, 8082)
DEFAULT_API_PORT = 8000
# One port per worker process: two workers given the same WORKER_METRICS_PORT race for it, and
# the loser's tasks appear in no metrics. The first is WORKER_METRICS_PORT's default.
DEFAULT_METRICS_PORTS = (9808, 9809, 9810)  # worker, interactive worker, webhook consumer
METRICS_HOST = "127.0.0.1"
# redis-py also reads a password from the query string (`?password=`).
_PASSWORD_QUERY = re.compile(r"(?i)((?:^|&)password=)[^&]*")


@dataclass(frozen=True)
class LocalConfig:
    """Where `make run` keeps its files and which ports it binds (all on 127.0.0.1)."""

    workdir: Path = DEFAULT_WORKDIR
    api_port: int = DEFAULT_API_PORT
    redis_port: int | None = None  # None: a free port, kept across restarts of redis-server
    torchserve_ports: tuple[int, int, int] = DEFAULT_TORCHSERVE_PORTS
    torchserve_grpc_ports: tuple[int, int] | None = None  # None: free ports
    metrics_ports: tuple[int, int, int] = DEFAULT_METRICS_PORTS  # worker, interactive, webhooks
    redis_url: str | None = None  # set: use that Redis, start none
    torchserve_url: str | None = None  # set: use that TorchServe, start none
    api_workers: int = 1  # API processes (uvicorn --workers), API_WORKERS

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] = os.environ, env_file: Path = REPO_ROOT / ".env"
    ) -> LocalConfig:
        """The knobs from `environ`; API_WORKERS from `env_file` too (the API's processes read
        it: they run in the repository root)."""
        try:
            listed = environ.get("DEVSTACK_TORCHSERVE_PORTS", "").split(",")
            ports = tuple(int(port) for port in listed if port) or DEFAULT_TORCHSERVE_PORTS
            if len(ports) not in (3, 5):
                raise ValueError("DEVSTACK_TORCHSERVE_PORTS needs three or five ports")
            listed = environ.get("DEVSTACK_METRICS_PORTS", "").split(",")
            metrics = tuple(int(port) for port in listed if port) or DEFAULT_METRICS_PORTS
            if len(metrics) != 3 or len(set(metrics)) != 3 or not all(metrics):
                raise ValueError("DEVSTACK_METRICS_PORTS needs three different ports")
            redis_port = environ.get("DEVSTACK_REDIS_PORT")
            return cls(
                workdir=Path(environ.get("DEVSTACK_WORKDIR") or DEFAULT_WORKDIR).resolve(),
                api_port=int(environ.get("PORT") or DEFAULT_API_PORT),
                redis_port=int(redis_port) if redis_port else None,
                torchserve_ports=(ports[0], ports[1], ports[2]),
                torchserve_grpc_ports=(ports[3], ports[4]) if len(ports) == 5 else None,
                metrics_ports=(metrics[0], metrics[1], metrics[2]),
                redis_url=environ.get("REDIS_URL") or None,
                torchserve_url=environ.get("TORCHSERVE_URL") or None,
                api_workers=_api_workers(environ, env_file),
            )
        except ValueError as exc:
            raise SystemExit(
                f"bad devstack setting: {exc} (PORT, DEVSTACK_REDIS_PORT, "
                "DEVSTACK_TORCHSERVE_PORTS and DEVSTACK_METRICS_PORTS take port numbers, the "
                "last two three (or five for TorchServe) of them, comma-separated; API_WORKERS "
                "a number of processes, 1-64)"
            ) from exc


def _api_workers(environ: Mapping[str, str], env_file: Path) -> int:
    """API_WORKERS from the environment, else from the `.env` that the API's processes read
    (they run in the repository root, where shared/settings.py finds it)."""
    raw = environ.get("API_WORKERS") or dotenv_values(env_file).get("API_WORKERS")
    return TypeAdapter(ApiWorkers).validate_python(raw or 1)


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _require_free(port: int, hint: str) -> None:
    if _port_in_use(port):
        raise SystemExit(f"127.0.0.1:{port} is in use already; {hint}")


def _check_ports(config: LocalConfig) -> None:
    """Fail before starting anything if a fixed port is taken (e.g. by a previous run)."""
    if config.torchserve_url is None:
        for port in (*config.torchserve_ports, *(config.torchserve_grpc_ports or ())):
            _require_free(port, "stop what listens there, or set TORCHSERVE_URL to use it")
    if config.redis_url is None and config.redis_port is not None:
        _require_free(config.redis_port, "stop what listens there, or set DEVSTACK_REDIS_PORT")
    for port in config.metrics_ports:
        _require_free(port, "stop what listens there, or set DEVSTACK_METRICS_PORTS")
    _require_free(config.api_port, "stop what listens there, or set PORT to use another port")


def masked_url(url: str) -> str:
    """REDIS_URL as the banner may show it: each part's (a sentinel URL has several) password,
    or a lone userinfo (it may be a password), and any `password=` query value as `***`; the
    rest as given. Secrets never land in logs."""
    parts = url.split(";") if is_sentinel_url(url) else [url]
    return ";".join(_masked_part(part) for part in parts)


def _masked_part(part: str) -> str:
    scheme, found, _ = part.partition("://")
    try:
        split = urlsplit(part)
        split.port  # noqa: B018 (raises ValueError unless the port is a number)
    except ValueError:
        split = None
    if not found or split is None:  # malformed: a secret could be anywhere in it
        return f"{scheme if found else 'redis'}://(not shown)"
    netloc = split.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    query = _PASSWORD_QUERY.sub(r"\1***", split.query)
    return urlunsplit(split._replace(netloc=netloc, query=query))


def _start_redis(supervisor: Supervisor, config: LocalConfig) -> str:
    if config.redis_url:
        print(f"Using Redis at {masked_url(config.redis_url)} (REDIS_URL)")
        return config.redis_url
    # A fixed data directory, and the append-only file fsynced on every write: Redis answers a
    # write only once it is on disk, so a task the API accepted (202) survives a SIGKILL or a
    # power cut of redis-server, and a restart (same directory, same port) replays it. The cost,
    # one fsync per write, is small next to a prediction; `everysec` could lose the last second.
    server = RedisServer(config.workdir / "redis", config.redis_port, appendfsync="always")
    print(f"Starting redis-server on port {server.port} ...", flush=True)
    supervisor.start("redis-server", server)
    return server.url


def _start_torchserve(supervisor: Supervisor, config: LocalConfig) -> tuple[str, TorchServe | None]:
    """TorchServe's inference URL, and the server when this stack started it."""
    if config.torchserve_url:
        print(f"Using TorchServe at {config.torchserve_url} (TORCHSERVE_URL)")
        return config.torchserve_url, None
    store = config.workdir / "model-store"
    models = archive_demo_models(store)
    grpc = config.torchserve_grpc_ports
    server = TorchServe(
        config.workdir / "torchserve",
        store,
        models,
        ports=config.torchserve_ports,
        extra_config=(
            {"grpc_inference_port": str(grpc[0]), "grpc_management_port": str(grpc[1])}
            if grpc
            else None
        ),
    )
    print(f"Starting TorchServe with {', '.join(models)} (takes a few seconds) ...", flush=True)
    supervisor.start("TorchServe", server)
    print(f"TorchServe ready after {server.start_seconds:.1f} s")
    return server.inference_url, server


def metrics_env(env: dict[str, str], setting: str, port: int) -> dict[str, str]:
    """`env` plus one worker's own metrics port, on loopback like everything of make run."""
    return {**env, setting: str(port), "WORKER_METRICS_HOST": METRICS_HOST}


def _start_dispatcher(
    supervisor: Supervisor, config: LocalConfig, env: dict[str, str]
) -> tuple[str, list[tuple[str, str]]]:
    """Start the workers and the API; the API's URL and (name, URL) of every /metrics."""
    logs = config.workdir / "logs"
    worker_port, interactive_port, webhooks_port = config.metrics_ports
    worker = CeleryWorker(
        metrics_env(env, "WORKER_METRICS_PORT", worker_port), "local", logs / "worker.log"
    )
    print("Starting the Celery worker ...", flush=True)
    supervisor.start("Celery worker", worker)
    # Capacity that a batch backlog cannot take from synchronous callers (shared/priorities.py).
    reserved = CeleryWorker.interactive(
        metrics_env(env, "WORKER_METRICS_PORT", interactive_port),
        "interactive",
        logs / "worker-interactive.log",
    )
    print("Starting the interactive worker ...", flush=True)
    supervisor.start("interactive worker", reserved)
    webhooks = CeleryWorker.webhook_consumer(
        metrics_env(env, "WEBHOOK_METRICS_PORT", webhooks_port), logs / "webhooks.log"
    )
    print("Starting the webhook consumer ...", flush=True)
    supervisor.start("webhook consumer", webhooks)
    api = ApiServer(
        env,
        logs / "api.log",
        config.api_port,
        workers=config.api_workers,
        metrics_dir=config.workdir / "api-metrics",
    )
    if api.metrics_dir is None:
        print(f"Starting the API on port {api.port} ...", flush=True)
    else:
        print(
            f"Starting the API on port {api.port}: {api.workers} processes (API_WORKERS), "
            f"reporting metrics through {api.metrics_dir} (PROMETHEUS_MULTIPROC_DIR, emptied "
            "at each start) ...",
            flush=True,
        )
    supervisor.start("API server", api)
    metrics = [
        ("API server", f"{api.url}/metrics"),
        ("Celery worker", f"http://{METRICS_HOST}:{worker_port}/metrics"),
        ("interactive worker", f"http://{METRICS_HOST}:{interactive_port}/metrics"),
        ("webhook consumer", f"http://{METRICS_HOST}:{webhooks_port}/metrics"),
    ]
    return api.url, metrics


def _listing(entries: Sequence[tuple[str, object]]) -> str:
    width = max((len(name) for name, _ in entries), default=0)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in entries)


def _banner(
    api_url: str,
    logs: Sequence[tuple[str, Path]],
    metrics: Sequence[tuple[str, str]] = (),
) -> str:
    picture = REPO_ROOT / "models" / "example.png"  # a small PNG shipped with the repository
    return f"""
The dispatcher is up at {api_url}  (Ctrl-C stops everything; a process that dies is restarted)
The operator console:  {api_url}/console  (queues, workers, failures, retry; in a browser)

Logs:
{_listing(logs)}

Metrics (Prometheus text format; each worker process serves its own):
{_listing(metrics)}

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

  # bytes in: a picture as a file part, or as the raw body (fields in the query string)
  curl -s {api_url}/dispatch_model -F model_name=image_info -F data=@{picture}
  curl -s '{api_url}/dispatch_model?model_name=image_info' \\
    -H 'content-type: image/png' --data-binary @{picture}

  # bytes out: the picture in grayscale; prediction_value is a data URI, /result the PNG
  curl -s '{api_url}/dispatch_model?model_name=grayscale' \\
    -H 'content-type: image/png' --data-binary @{picture}
  curl -s {api_url}/tasks/<task_id>/result -o out.png

  # the API's documentation, in a browser
  {api_url}/docs
"""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _log_to_stdout() -> None:
    """The supervisor's restart lines, timestamped, between the other output of `make run`."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("devstack.supervisor")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def run(config: LocalConfig | None = None) -> int:
    """Start Redis, TorchServe, a worker and the API; keep them up; stop them all on exit."""
    config = config or LocalConfig.from_env()
    # SIGTERM (e.g. from a process manager) shuts down like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    _check_ports(config)
    _log_to_stdout()
    supervisor = Supervisor()
    try:
        redis_url = _start_redis(supervisor, config)
        torchserve_url, torchserve = _start_torchserve(supervisor, config)
        env = {"REDIS_URL": redis_url, "TORCHSERVE_URL": torchserve_url}
        api_url, metrics = _start_dispatcher(supervisor, config, env)
        logs = [(child.name, child.log_path) for child in supervisor.children]
        if torchserve is not None:
            metrics.append(("TorchServe", f"{torchserve.metrics_url}/metrics"))
            logs.append(("TorchServe's own", torchserve.logs_dir))
        print(_banner(api_url, logs, metrics), flush=True)
        while True:  # the watcher threads do the work; this thread waits for Ctrl-C / SIGTERM
            signal.pause()
    except KeyboardInterrupt:
        print("\nStopping ...", flush=True)
        return 0
    except (TimeoutError, RuntimeError, OSError) as exc:
        print(f"\nCould not start the stack: {exc}\nStopping what did start ...", flush=True)
        return 1
    finally:
        # A second Ctrl-C must not cut the teardown short and leave servers running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        supervisor.stop()
        print(supervisor.summary(), flush=True)
