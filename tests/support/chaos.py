"""`make chaos`: the fault scenarios, many times each, on a loaded machine; not part of `make test`.

A race shows up one run in ten or twenty, not in the single run of `make test`: the Redis outage
test once killed a worker in CI after passing 8 of 8 alone (worker/kombu_patches/closed_channel.py).
This harness runs each scenario's test file `--count` times in a row (pytest-repeat, one pytest
session per scenario, so TorchServe starts once) while CPU hogs keep both cores busy, then prints
"passed N of N" per scenario and writes that table into docs/RELIABILITY.md between the chaos
markers.

    .venv/bin/python tests/support/chaos.py               # every scenario, default counts, 2 hogs
    .venv/bin/python tests/support/chaos.py --only redis_outage --count 5 --hogs 0 --no-write
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "RELIABILITY.md"
BEGIN, END = "<!-- chaos:begin -->", "<!-- chaos:end -->"


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    test_file: str
    count: int


SCENARIOS = (
    Scenario(
        "redis_outage",
        "Redis stopped and restarted under load",
        "reliability/test_redis_outage.py",
        20,
    ),
    Scenario(
        "worker_kill",
        "Worker SIGKILLed mid-flight, with 300 calls in flight, and on every delivery",
        "reliability/test_worker_kill.py",
        10,
    ),
    Scenario(
        "torchserve_outage",
        "TorchServe queue full, down and back, down for good",
        "reliability/test_torchserve_outage.py",
        10,
    ),
    Scenario(
        "deadlines_cancel",
        "Deadlines (queued, running) and cancel",
        "reliability/test_deadlines_cancel.py",
        10,
    ),
    Scenario(
        "backpressure", "Queue full: 429 with Retry-After", "reliability/test_backpressure.py", 10
    ),
    Scenario(
        "redis_refuses_writes",
        "Redis refusing writes (OOM, read-only replica)",
        "reliability/test_redis_refuses_writes.py",
        10,
    ),
    Scenario(
        "long_task",
        "Task longer than the visibility timeout",
        "reliability/test_long_task.py",
        10,
    ),
    Scenario(
        "sentinel_failover",
        "Sentinel faults under ~100 submits/s (the issue 19 fault table, 8 faults)",
        "reliability/test_sentinel_failover.py",
        10,
    ),
)


@dataclass
class Outcome:
    scenario: Scenario
    runs: int
    passed: int
    seconds: float
    failures: list[str]


def _spin() -> None:
    while True:
        pass


def _run(scenario: Scenario, count: int, report_dir: Path) -> Outcome:
    junit = report_dir / f"{scenario.name}.xml"
    command = [
        sys.executable, "-m", "pytest", f"tests/{scenario.test_file}",
        f"--count={count}", "--repeat-scope=function", "-q", "-p", "no:cacheprovider",
        f"--junitxml={junit}", "-o", "junit_family=xunit1",
        # Its own temporary root: pytest prunes old numbered roots, and another pytest run on the
        # machine (the load) would otherwise delete this one's Redis and TorchServe directories.
        f"--basetemp={report_dir / scenario.name}",
    ]  # fmt: skip
    started = time.monotonic()
    print(f"== {scenario.name}: {count} x {scenario.test_file}", flush=True)
    subprocess.run(command, cwd=ROOT, check=False)
    seconds = time.monotonic() - started
    if not junit.exists():
        return Outcome(scenario, count, 0, seconds, ["pytest produced no report"])
    # A round passes when every test of the file passed in it (pytest-repeat suffixes `[i-N]`).
    rounds: Counter[str] = Counter()
    failed_rounds: set[str] = set()
    failures = []
    for case in ET.parse(junit).getroot().iter("testcase"):  # noqa: S314 (our own report)
        match = re.search(r"\[(?:.*-)?(\d+)-\d+\]$", case.get("name", ""))
        round_id = match.group(1) if match else "1"
        rounds[round_id] += 1
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is None:
            # A skipped test proved nothing: the round it belongs to did not pass.
            problem = case.find("skipped")
        if problem is not None:
            failed_rounds.add(round_id)
            failures.append(f"{case.get('name')}: {problem.get('message', '')[:200]}")
    runs = max(len(rounds), count)
    return Outcome(scenario, runs, runs - len(failed_rounds), seconds, failures)


def _table(outcomes: list[Outcome], hogs: int, command: str) -> str:
    lines = [
        BEGIN,
        f"Last run: {time.strftime('%Y-%m-%d')}, `{command}`, {hogs} CPU hog process(es) "
        f"on {multiprocessing.cpu_count()} cores.",
        "",
        "| Scenario | Test file | Passed | Time |",
        "| --- | --- | --- | --- |",
    ]
    for o in outcomes:
        lines.append(
            f"| {o.scenario.title} | `{o.scenario.test_file}` | passed {o.passed} of {o.runs} "
            f"| {o.seconds:.0f} s |"
        )
    lines.append(END)
    return "\n".join(lines)


def _write(table: str) -> None:
    text = DOC.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + table + rest.split(END, 1)[1]
    else:
        text += "\n## Chaos harness (`make chaos`)\n\n" + table + "\n"
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="scenario name (repeatable)")
    parser.add_argument("--count", type=int, help="runs per scenario (default: each one's own)")
    parser.add_argument("--hogs", type=int, default=2, help="CPU hog processes during the runs")
    parser.add_argument("--no-write", action="store_true", help="do not update RELIABILITY.md")
    args = parser.parse_args(argv)
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    if not chosen:
        parser.error(f"--only: choose from {', '.join(s.name for s in SCENARIOS)}")
    report_dir = ROOT / ".local" / "chaos"
    report_dir.mkdir(parents=True, exist_ok=True)
    hogs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.hogs)]
    for hog in hogs:
        hog.start()
    try:
        outcomes = [_run(s, args.count or s.count, report_dir) for s in chosen]
    finally:
        for hog in hogs:
            hog.kill()
            hog.join()
    table = _table(outcomes, args.hogs, "make chaos")
    print(table)
    for outcome in outcomes:
        for failure in outcome.failures:
            print(f"FAILED {outcome.scenario.name}: {failure}")
    if not args.no_write and not args.only and args.count is None:
        _write(table)
    return 0 if all(o.passed == o.runs for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
