"""`python -m bench [--smoke] [--profile] [--only NAME,...]`: run the benchmark, print the table,
write the doc (a run of some scenarios only writes none unless --output)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bench import report as reports
from bench.plan import FULL, SMOKE
from bench.progress import say
from bench.runner import NAMES, run
from bench.table import markdown
from devstack import REPO_ROOT

DEFAULT_OUTPUT = REPO_ROOT / "docs" / "BENCHMARKS.md"
DEFAULT_WORKDIR = REPO_ROOT / ".local" / "bench"


def _command(argv: list[str]) -> str:
    """The command as typed from the repository root (a venv python shown by its relative path)."""
    python = Path(sys.executable)
    try:
        shown = str(python.relative_to(REPO_ROOT))
    except ValueError:
        shown = str(python)
    return shlex.join([shown, "-m", "bench", *argv])


def _names(text: str) -> list[str]:
    """`--only`'s comma-separated scenario names, each one of NAMES."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(NAMES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {unknown}: choose from {NAMES}")
    return names


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny counts (< 1 min); writes no doc unless --output"
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the API and a worker under throughput load"
    )
    parser.add_argument("--workers", type=int, help=f"Celery worker processes ({FULL.workers})")
    parser.add_argument(
        "--concurrency", type=int, help=f"Celery concurrency per worker ({FULL.concurrency})"
    )
    parser.add_argument(
        "--pool", choices=["threads", "prefork", "solo"], help=f"Celery pool ({FULL.pool})"
    )
    parser.add_argument(
        "--output", type=Path, help=f"Markdown file to write (full run: {DEFAULT_OUTPUT})"
    )
    parser.add_argument(
        "--only",
        type=_names,
        default=[],
        metavar="NAME,...",
        help=f"only these scenarios, in plan order ({', '.join(NAMES)}); writes no doc unless "
        "--output",
    )
    parser.add_argument("--json", type=Path, help="also write the rows and raw figures as JSON")
    parser.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help="logs, archives (replaced each run)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    plan = (SMOKE if args.smoke else FULL).with_options(
        profile=args.profile, workers=args.workers, concurrency=args.concurrency, pool=args.pool
    )
    output = args.output or (None if args.smoke or args.only else DEFAULT_OUTPUT)
    try:
        result = run(plan, args.workdir.resolve(), _command(argv), args.only)
    except (RuntimeError, TimeoutError, FileNotFoundError) as error:
        say(f"benchmark failed: {error}")
        say(f"logs: {args.workdir}")
        return 1
    print(markdown(result.rows))
    print(f"\n{result.summary()}", flush=True)
    if output is not None:
        reports.write(result, output)
        say(f"wrote {output}")
    if args.json is not None:
        reports.write_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
