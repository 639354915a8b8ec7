"""The fault table of docs/RELIABILITY.md from the rows the failover tests append.

Each run of tests/reliability/test_sentinel_failover.py appends one JSON row per fault to
`.local/failover/<fault>.jsonl` (tests/support/failover_load.py, `Figures`); this prints one
Markdown line per fault over every row found: lost per run, and the range of each figure.

    .venv/bin/python -m tests.support.failover_table [.local/failover ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TITLES = {
    "primary_sigkill": "SIGKILL of the primary",
    "sentinel_failover": "`SENTINEL FAILOVER`",
    "primary_sigstop_5s": "SIGSTOP of the primary for 5 s, then SIGCONT",
    "replica_sigkill": "SIGKILL of one replica",
    "sentinel_sigkill": "SIGKILL of one sentinel",
    "worker_sigkill_in_failover": "SIGKILL of a worker during a `SENTINEL FAILOVER`",
    "two_failovers": "two `SENTINEL FAILOVER`s back to back",
    "old_primary_rejoins": "SIGKILL of the primary, restarted, rejoins as a replica",
}
HEADER = (
    "| Fault | Runs | Lost | Accepted | 503s | First 2xx after the fault | Switch | "
    "Ran twice (deliveries / model calls) | 503 but ran | Reconciled | Late sync waiters | "
    "Workers resume | Workers > 10 s |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def _span(values: list[Any], unit: str = "") -> str:
    found = [v for v in values if v is not None]
    if not found:
        return "-"
    low, high = min(found), max(found)
    text = f"{low:g}" if low == high else f"{low:g}-{high:g}"
    return text + unit


def line(fault: str, rows: list[dict[str, Any]]) -> str:
    def of(key: str) -> list[Any]:
        return [row.get(key) for row in rows]

    switch = [row.get("notes", {}).get("switch_s") for row in rows]
    stalled = [row["slow_workers"] + row["stalled_workers"] for row in rows]
    cells = [
        TITLES.get(fault, fault),
        str(len(rows)),
        ", ".join(str(row["lost"]) for row in rows),
        _span(of("accepted")),
        _span(of("refused_503")),
        _span(of("first_accept_s"), " s"),
        _span(switch, " s"),
        f"{_span(of('delivered_twice'))} / {_span(of('called_twice'))}",
        _span(of("refused_ran")),
        _span(of("reconciled")),
        _span(of("late_waiters")),
        _span(of("resume_s"), " s"),
        _span(stalled),
    ]
    return "| " + " | ".join(cells) + " |"


def table(directories: list[Path]) -> str:
    rows: dict[str, list[dict[str, Any]]] = {}
    for directory in directories:
        for path in sorted(directory.glob("*.jsonl")):
            for text in path.read_text().splitlines():
                if text.strip():
                    row = json.loads(text)
                    rows.setdefault(row["fault"], []).append(row)
    ordered = [fault for fault in TITLES if fault in rows] + sorted(set(rows) - set(TITLES))
    return "\n".join([HEADER, *(line(fault, rows[fault]) for fault in ordered)])


if __name__ == "__main__":
    given = [Path(arg) for arg in sys.argv[1:]] or [ROOT / ".local" / "failover"]
    print(table(given))
