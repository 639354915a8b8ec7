"""deploy/prometheus and deploy/grafana: rules that load and fire when they should, a dashboard
whose every query parses and names only metrics the dispatcher exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.paths import REPO as REPO_ROOT
from tests.support.paths import SUPPORT
from tests.support.promql_check import check_promql, exported_families, unknown_metrics
from tests.support.stack import require_tool

REPO = REPO_ROOT
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = SUPPORT / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dispatcher.json"
PROMTOOL = shutil.which("promtool")


@pytest.fixture
def needs_promtool() -> None:
    require_tool(
        PROMTOOL is not None, "no `promtool`: apt-get install prometheus (scripts/bootstrap.sh)"
    )


# Grafana's template variables, replaced by values PromQL accepts.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*", "$backend": ".*"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False, cwd=REPO
    )


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.mark.usefixtures("needs_promtool")
def test_alert_rules_load() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.usefixtures("needs_promtool")
def test_alerts_fire_on_the_series_they_watch() -> None:
    result = promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_cover_the_operational_questions() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    watched = {
        "DispatcherQueueGrowing": "dispatcher_queue_depth",
        "DispatcherModelFailureRatio": "dispatcher_tasks_finished_total",
        "DispatcherNoLiveWorkers": "dispatcher_workers_alive",
        "DispatcherSlowTasks": "dispatcher_task_total_seconds_bucket",
        "DispatcherBackendFailing": "dispatcher_backend_request_duration_seconds_count",
    }
    for alert, metric in watched.items():
        assert metric in rules[alert]["expr"], alert
    assert "by (model" in rules["DispatcherModelFailureRatio"]["expr"]
    assert "0.95" in rules["DispatcherSlowTasks"]["expr"]
    assert "by (backend)" in rules["DispatcherBackendFailing"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
    assert not unknown_metrics(rule["expr"] for rule in rules.values())


# Two backends called for 40 minutes: `mls` fails a third of its attempts (refused, timed out),
# over two worker replicas; `llm` is refused half its input by the model, which is the callers'
# fault, not the server's, and so no alert.
BACKEND_SERIES = {
    'outcome="ok", backend="mls", instance="w1"': "0+30x40",
    'outcome="ok", backend="mls", instance="w2"': "0+30x40",
    'outcome="backend_unavailable", backend="mls", instance="w1"': "0+20x40",
    'outcome="backend_timeout", backend="mls", instance="w2"': "0+10x40",
    'outcome="ok", backend="llm", instance="w1"': "0+100x40",
    'outcome="model_rejected_input", backend="llm", instance="w1"': "0+100x40",
}


@pytest.mark.usefixtures("needs_promtool")
def test_backend_alert_fires_on_server_failures_only(tmp_path: Path) -> None:
    """DispatcherBackendFailing (promtool test rules): the backend whose server fails, once the
    alert has been pending its 10 minutes; never the one whose callers send bad input."""
    metric = "dispatcher_backend_request_duration_seconds_count"
    series = [
        {"series": f'{metric}{{{labels}, model="m"}}', "values": values}
        for labels, values in BACKEND_SERIES.items()
    ]
    firing = {
        "exp_labels": {"severity": "warning", "backend": "mls"},
        "exp_annotations": {
            "summary": "Backend mls: 33.33% of call attempts fail",
            "description": (
                f'See {metric}{{backend="mls"}} by outcome and dispatcher_backend_retries_total '
                "by code, and GET /backends for its health: backend_unavailable or "
                "backend_timeout point at the server or the network, backend_auth_rejected at "
                "its token in BACKENDS, backend_error at the model."
            ),
        },
    }
    alert = "DispatcherBackendFailing"
    spec = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "8m", "alertname": alert, "exp_alerts": []},  # pending
                    {"eval_time": "25m", "alertname": alert, "exp_alerts": [firing]},
                ],
            }
        ],
    }
    path = tmp_path / "backend_alert_test.yml"
    path.write_text(yaml.safe_dump(spec))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    # And it has teeth: the same test with the failures counted as the model's fails.
    quiet = spec["tests"][0]["input_series"]
    for entry in quiet:
        entry["series"] = entry["series"].replace("backend_unavailable", "model_not_found")
        entry["series"] = entry["series"].replace("backend_timeout", "model_rejected_input")
    path.write_text(yaml.safe_dump(spec))
    assert promtool("test", "rules", str(path)).returncode != 0


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append(target["expr"])
    return queries


def test_dashboard_queries_only_metrics_we_export() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 15
    assert not unknown_metrics(queries), unknown_metrics(queries)
    # Every metric family has a panel.
    used = {name for query in queries for name in re.findall(r"\bdispatcher_[a-z0-9_]+", query)}
    missing = {
        family
        for family in exported_families()
        if not any(name == family or name.startswith(family + "_") for name in used)
    }
    assert not missing, f"no panel for {missing}"


@pytest.mark.usefixtures("needs_promtool")
def test_dashboard_queries_parse() -> None:
    assert PROMTOOL is not None
    expressions = []
    for query in dashboard_queries():
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        assert "$" not in query, f"unknown variable in {query}"
        expressions.append(query)
    check_promql(expressions, PROMTOOL)


def test_dashboard_is_provisionable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "model-dispatcher"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {item["name"] for item in dashboard["templating"]["list"]}
    assert {"datasource", "model", "backend"} <= variables
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


@pytest.mark.usefixtures("needs_promtool")
def test_compose_prometheus_config_loads(tmp_path: Path) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    config["rule_files"] = [str(ALERTS)]  # where docker-compose.yml mounts it, here
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(checked))
    assert result.returncode == 0, result.stdout + result.stderr
