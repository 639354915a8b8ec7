"""PromQL checks shared by the deployment tests: syntax (promtool) and metric names we export."""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

import api.metrics
import worker.task_metrics  # registers the worker's metrics
import worker.webhooks  # noqa: F401 - registers the webhook consumer's metrics

METRIC_NAME = re.compile(r"\b(dispatcher_[a-z0-9_]+)\b")
SUFFIXES = ("_bucket", "_sum", "_count", "_total")


def exported_families() -> set[str]:
    """The dispatcher's metric families (counters without `_total`), API and workers."""
    families = [*REGISTRY.collect(), *api.metrics.QueueState({"dispatch": 1}, 1, 1).collect()]
    return {family.name for family in families if family.name.startswith("dispatcher_")}


def exported_metric_names() -> set[str]:
    """Every series name the API's and the workers' /metrics can expose."""
    families = exported_families()
    return families | {family + suffix for family in families for suffix in SUFFIXES}


def unknown_metrics(expressions: Iterable[str]) -> set[str]:
    exported = exported_metric_names()
    return {name for e in expressions for name in METRIC_NAME.findall(e)} - exported


def check_promql(expressions: list[str], promtool: str) -> None:
    """Syntax-check PromQL with promtool, as recording rules of a throwaway rule file."""
    rules = [{"record": f"check:{i}", "expr": expr} for i, expr in enumerate(expressions)]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "check.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
        result = subprocess.run(
            [promtool, "check", "rules", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stdout + result.stderr
