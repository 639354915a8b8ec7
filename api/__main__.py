"""`python -m api [--host H] [--port P] [--no-access-log]`: uvicorn with API_WORKERS processes.

What the API image runs. uvicorn's own command line would need the process count written into it;
this reads it from the settings (the environment or `.env`, validated like every other setting),
prepares Prometheus' multiprocess directory, then *execs* uvicorn: uvicorn becomes this process
(PID 1 in a container, so SIGTERM reaches it and shuts down gracefully) and nothing imported here
stays in memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import NoReturn

from shared.prometheus import MULTIPROC_ENV
from shared.settings import get_settings

APP = "api.main:create_app"
DEFAULT_PORT = 8000


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m api", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port ({DEFAULT_PORT})")
    parser.add_argument(
        "--no-access-log", action="store_true", help="no log line per request (saves API CPU)"
    )
    return parser.parse_args(argv)


def prepare_metrics_dir(workers: int, environ: MutableMapping[str, str]) -> str | None:
    """The PROMETHEUS_MULTIPROC_DIR of this start, empty; None when one process needs none.

    Several processes must share one directory (each writes its samples there, the scraped one
    reads them all), and it must start empty: files left by the processes of an earlier start
    would be counted again. A directory given in the environment is used (its stale `*.db` files
    removed); otherwise several processes get a fresh temporary one.
    """
    configured = environ.get(MULTIPROC_ENV)
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
        return configured
    if workers == 1:
        return None
    fresh = tempfile.mkdtemp(prefix="dispatcher-api-metrics-")
    environ[MULTIPROC_ENV] = fresh
    return fresh


def uvicorn_command(args: argparse.Namespace, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", APP,
        "--factory",
        "--host", args.host,
        "--port", str(args.port),
        "--workers", str(workers),
        *(["--no-access-log"] if args.no_access_log else []),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> NoReturn:
    args = parse(sys.argv[1:] if argv is None else argv)
    workers = get_settings().api_workers
    prepare_metrics_dir(workers, os.environ)
    command = uvicorn_command(args, workers)
    os.execv(command[0], command)  # noqa: S606 (our own interpreter, a fixed argument list)


if __name__ == "__main__":
    main()
