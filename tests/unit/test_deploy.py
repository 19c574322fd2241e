"""deploy/: the alert rules checked and unit-tested by promtool, each alert tested firing and
with a runbook line; the dashboard well-formed; Prometheus's own config valid.

promtool comes with Debian's `prometheus` package (`apt-get install prometheus`; .ci/run
installs it); without it the promtool tests skip, saying so. That the exporter serves every
metric these query is tests/acceptance/test_observability.py, on real workers.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.support import promql


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = promql.promtool()
    if binary is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return subprocess.run(
        [binary, *args], cwd=promql.REPO, capture_output=True, text=True, timeout=60
    )


def test_promtool__check_rules_accepts_the_alert_rules() -> None:
    done = run_promtool("check", "rules", str(promql.RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(promql.rules())} rules found" in done.stdout


def test_promtool__unit_tests_of_every_alert_pass() -> None:
    done = run_promtool("test", "rules", str(promql.RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool__check_config_accepts_the_compose_prometheus_config() -> None:
    done = run_promtool("check", "config", str(promql.PROMETHEUS_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr


def test_rule_tests__every_alert_fires_in_one_case_and_stays_quiet_in_another() -> None:
    tests = yaml.safe_load(promql.RULE_TESTS.read_text())
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in promql.rules()}
    assert alerts - fired == set(), "alerts no test sees firing"
    assert alerts - quiet == set(), "alerts no test sees quiet"
    assert (fired | quiet) - alerts == set(), "tests of alerts that do not exist"


def test_rules__each_has_a_summary_a_runbook_line_and_a_severity() -> None:
    for rule in promql.rules():
        annotations = rule.get("annotations") or {}
        assert annotations.get("summary"), rule["alert"]
        runbook = annotations.get("runbook", "")
        assert len(runbook) > 40, (rule["alert"], runbook)
        assert "\n" not in runbook, (rule["alert"], runbook)
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]


def test_dashboard__panels_fit_the_grid_use_the_datasource_variable_and_query_something() -> None:
    board = promql.dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert board["uid"]
    assert board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    titles = set()
    for panel in promql.panels():
        grid = panel["gridPos"]
        assert 0 <= grid["x"] < grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert "pipeline_" in target["expr"], (panel["title"], target["expr"])
            assert target["datasource"]["uid"] == "${datasource}"
        titles.add(panel["title"])
    # What the issue asks the dashboard to show.
    for wanted in (
        "Throughput",
        "Files by status",
        "Backlog age",
        "Attempts by outcome (15 min)",
        "Dead files (15 min)",
        "Expired leases",
        "Active batches",
    ):
        assert wanted in titles, wanted


def test_queries__pick_out_selectors_labels_and_legends() -> None:
    """The parser the acceptance test relies on, on one expression of each shape."""
    q = promql.Query(
        "x",
        'sum by (le, outcome) (pipeline_window_run_seconds_bucket{outcome=~"failed|lost"})'
        " and on() pipeline_up == 1",
        frozenset({"outcome"}),
    )
    assert q.selectors() == [
        ("pipeline_window_run_seconds_bucket", {"outcome"}),
        ("pipeline_up", set()),
    ]
    assert q.grouping_labels() == {"le", "outcome"}
    names = {name for query in promql.wanted() for name, _ in query.selectors()}
    assert "pipeline_batch_estimated_end_timestamp_seconds" in names
    assert "pipeline_window_pickup_latency_seconds_bucket" in names
