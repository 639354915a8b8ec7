"""Command line of the local stack: `python -m devstack run`."""

from __future__ import annotations

import argparse

from devstack.local import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "run",
        help="Redis, TorchServe (demo models), the Celery workers and the API until Ctrl-C",
        description="Starts a private redis-server unless REDIS_URL is set, TorchServe on "
        "127.0.0.1:8080-8082 unless TORCHSERVE_URL is set, a Celery worker, an interactive "
        "worker and the webhook consumer (their metrics on 127.0.0.1:9808, 9809 and 9810; "
        "DEVSTACK_METRICS_PORTS overrides) and the API on 127.0.0.1:8000 (PORT overrides). "
        "Everything lives under .local/; the banner lists every log and metrics URL.",
    )
    args = parser.parse_args(argv)
    if args.command == "run":
        return run()
    parser.error(f"unknown command {args.command}")  # unreachable: argparse checks choices
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
