"""Schemathesis against the running API's own /openapi.json: no input makes it answer 5xx.

Every operation gets bounded, seeded examples (coverage, fuzzing and stateful phases: submit,
then read and cancel what was submitted). Dispatches answer at once (DISPATCH_MAX_WAIT=0), so a
5xx can only be the API's own failure, never TorchServe's answer to a random model name.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from devstack import RedisServer
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
SEED = "20261126"
MAX_EXAMPLES = "50"


def _statuses(report_dir: Path) -> Counter[int]:
    """Response status codes from schemathesis's NDJSON event stream."""
    statuses: Counter[int] = Counter()
    for path in report_dir.glob("*.ndjson"):
        for line in path.read_text().splitlines():
            for status in _find_statuses(json.loads(line)):
                statuses[status] += 1
    return statuses


def _find_statuses(node: object) -> list[int]:
    if isinstance(node, dict):
        found = []
        response = node.get("response")
        if isinstance(response, dict) and isinstance(response.get("status_code"), int):
            found.append(response["status_code"])
        for value in node.values():
            found += _find_statuses(value)
        return found
    if isinstance(node, list):
        return [status for item in node for status in _find_statuses(item)]
    return []


def test_schemathesis_finds_no_5xx(
    dedicated_redis: RedisServer, stack_factory: StackFactory, tmp_path: Path
) -> None:
    env = {
        "REDIS_URL": dedicated_redis.url,
        "DISPATCH_DEFAULT_WAIT": "0",
        "DISPATCH_MAX_WAIT": "0",
    }
    stack = stack_factory.start(workers=1, env=env)
    report_dir = tmp_path / "schemathesis"
    argv = [
        str(SCHEMATHESIS), "run", f"{stack.api_url}/openapi.json",
        "--checks", "not_a_server_error",
        "--max-examples", MAX_EXAMPLES,
        "--seed", SEED,
        "--generation-database", "none",
        "--request-timeout", "10",
        "--workers", "1",
        "--suppress-health-check", "all",
        "--no-color",
        "--report", "ndjson",
        "--report-dir", str(report_dir),
    ]  # fmt: skip
    # From tmp_path: schemathesis keeps a crash cache in the working directory.
    result = subprocess.run(
        argv, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False
    )
    statuses = _statuses(report_dir)
    summary = [line for line in result.stdout.splitlines() if "generated" in line]
    by_status = dict(sorted(statuses.items()))
    print(f"\nFUZZ: {' '.join(summary).strip()}; responses by status: {by_status}")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert sum(statuses.values()) > 200  # it really exercised the API
    assert not [status for status in statuses if status >= 500]
