"""Schemathesis against the running stack's own /openapi.json, every check on: the document says
exactly what the server does, and no input makes the server fail.

Every operation gets bounded, seeded cases in the coverage, fuzzing and stateful phases (submit,
then read, poll and cancel what was submitted), authenticated with an API key so the routes
behind it are exercised (and `ignored_auth` can check that they need it). Dispatches answer at
once (DISPATCH_MAX_WAIT=0), so a 5xx can only be the API's own failure, never TorchServe's
answer to a random model name. Any finding fails the test, with schemathesis's report.

The rules OpenAPI cannot express (request fields in the query string for a raw body only) are
held in the generated cases by tests/security/fuzz_hooks.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from devstack import RedisServer
from tests.security.fuzz_hooks import FUZZ_BACKENDS
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
SEED = "20261126"
MAX_EXAMPLES = "25"
# The run's own bound (the stack's start and stop come on top): the test stays under 3 minutes.
MAX_SECONDS = 100
KEY = "fuzz-test-key-0123456789"
EXCLUDED_CHECKS = {
    # DELETE /tasks/{id} and DELETE /batches/{id} cancel: the task or batch stays readable (as
    # `canceled`, the docs of both operations say so), where the check expects a 404.
    "use_after_free",
}
# Examples assembles cases from the `examples` of single fields without the schema's rules that
# span fields, and applies no filter hook; coverage and fuzzing draw from the whole schema.
PHASES = "coverage,fuzzing,stateful"


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


def test_schemathesis_finds_nothing(
    dedicated_redis: RedisServer, stack_factory: StackFactory, tmp_path: Path
) -> None:
    env = {
        "REDIS_URL": dedicated_redis.url,
        "DISPATCH_DEFAULT_WAIT": "0",
        "DISPATCH_MAX_WAIT": "0",
        "DISPATCHER_API_KEYS": KEY,
        # Every protocol's rules in the document and the server (api/backend_schema.py).
        "BACKENDS": json.dumps(FUZZ_BACKENDS),
    }
    stack = stack_factory.start(workers=1, env=env)
    report_dir = tmp_path / "schemathesis"
    argv = [
        str(SCHEMATHESIS), "run", f"{stack.api_url}/openapi.json",
        "--checks", "all",
        "--exclude-checks", ",".join(sorted(EXCLUDED_CHECKS)),
        "--phases", PHASES,
        "--header", f"Authorization: Bearer {KEY}",
        "--max-examples", MAX_EXAMPLES,
        "--max-time", str(MAX_SECONDS),
        "--seed", SEED,
        "--generation-database", "none",
        "--request-timeout", "10",
        # One worker: hypothesis' lambda descriptions are not thread-safe (a runtime error).
        "--workers", "1",
        "--suppress-health-check", "all",
        "--no-color",
        "--report", "ndjson",
        "--report-dir", str(report_dir),
    ]  # fmt: skip
    hooks_env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.security.fuzz_hooks",
        "PYTHONPATH": str(ROOT),
    }
    # From tmp_path: schemathesis keeps a crash cache in the working directory.
    try:
        result = subprocess.run(
            argv,
            cwd=tmp_path,
            env=hooks_env,
            capture_output=True,
            text=True,
            timeout=MAX_SECONDS + 60,
            check=False,
        )
    except subprocess.TimeoutExpired as late:
        shown = (late.stdout or b"")[-6000:]
        pytest.fail(f"schemathesis overran --max-time:\n{shown!r}")
    statuses = _statuses(report_dir)
    summary = [line for line in result.stdout.splitlines() if "generated" in line]
    by_status = dict(sorted(statuses.items()))
    print(f"\nFUZZ: {' '.join(summary).strip()}; responses by status: {by_status}")
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert sum(statuses.values()) > 200  # it really exercised the API
    assert not [status for status in statuses if status >= 500]
    assert statuses[202] > 0  # submits were accepted
    assert statuses[401] > 0  # and requests without the key refused
