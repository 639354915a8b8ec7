"""The benchmark harness in smoke mode: every scenario runs on a real stack and yields numbers.

The full run (`make bench`) stays out of the test suite; this keeps its code from rotting. It runs
`python -m bench --smoke` as a user would and checks the printed table, the JSON figures and the
written document.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.support.paths import REPO as REPO_ROOT

pytestmark = pytest.mark.e2e

REPO_ROOT = REPO_ROOT
HEADER = "| scenario | measure | direct TorchServe | dispatcher | ratio | target | met? |"
ROW_KEYS = {
    "latency_p50",
    "latency_p99",
    "throughput",
    "own_cpu",
    "peer",
    "burst_failures",
    "burst_drain",
    "waiting_succeeded",
    "waiting_threads",
    "waiting_rss",
    "mixed_p99",
    "mixed_p50",
    "mixed_batch",
    "scale_2",
    "scale_4",
    "cpu_model",
    "oip_throughput",
    "oip_latency_p50",
    "long_calls",
    "long_calls_threads",
    "long_calls_rss",
    "submit",
    "api_processes_submit",
    "api_processes_waiters",
    "figures_cost",
    "figures_throughput",
    "pubsub",
}
# What the dispatcher must get right even at smoke scale (throughput targets are not judged
# here: tiny counts on a shared machine say nothing about them).
MUST_MEET = (
    "long_calls",  # every call ends (the smoke run's few short calls fit in any engine)
    "burst_failures",
    "waiting_succeeded",
    "waiting_threads",
    "mixed_batch",
    "api_processes_waiters",
    "pubsub",
)
SMOKE_TIMEOUT = 240


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    doc, figures = out / "BENCHMARKS.md", out / "rows.json"
    argv = [sys.executable, "-m", "bench", "--smoke", "--output", str(doc), "--json", str(figures)]
    result = subprocess.run(
        [*argv, "--workdir", str(out / "work")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-6000:]}"
    return {
        "stdout": result.stdout,
        "stderr": result.stderr,
        "doc": doc.read_text(),
        "rows": {row["key"]: row for row in json.loads(figures.read_text())["rows"]},
    }


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
def test_every_scenario_has_finite_positive_figures(smoke: dict[str, Any]) -> None:
    rows = smoke["rows"]
    assert set(rows) == ROW_KEYS
    for key, row in rows.items():
        assert row["figures"], f"{key} has no figures"
        for name, value in row["figures"].items():
            assert math.isfinite(value), f"{key}.{name} = {value}"
            assert value > 0, f"{key}.{name} = {value}"
        assert row["dispatcher"] not in ("", "-"), key


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
def test_the_dispatcher_serves_bursts_and_waiters_without_leaks(smoke: dict[str, Any]) -> None:
    rows = smoke["rows"]
    for key in MUST_MEET:
        assert rows[key]["met"] is True, rows[key]
    burst = rows["burst_failures"]["figures"]
    assert burst["dispatcher_succeeded"] == burst["requests"]
    # Every waiter through several API processes got the answer to its own input.
    waiters = rows["api_processes_waiters"]["figures"]
    assert waiters["processes_served"] == 2


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
def test_the_table_is_printed_and_written_with_machine_and_command(smoke: dict[str, Any]) -> None:
    table = [line for line in smoke["stdout"].splitlines() if line.startswith("| ")]
    assert table[0] == HEADER
    assert len(table) == 2 + len(ROW_KEYS)  # header, separator, one line per row
    doc = smoke["doc"]
    assert "\n".join(table) in doc
    assert f"{os.cpu_count()} cores" in doc
    assert "GiB memory" in doc
    assert "-m bench --smoke" in doc


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
def test_progress_goes_to_stderr_one_line_per_phase(smoke: dict[str, Any]) -> None:
    progress = smoke["stderr"]
    for phase in (
        "latency:",
        "throughput:",
        "peer:",
        "burst:",
        "waiting clients:",
        "mixed load:",
        "scale:",
        "oip:",
        "submit rate:",
        "API processes:",
        "pub/sub",
    ):
        assert phase in progress, phase
    assert "[bench" not in smoke["stdout"]
