"""What the dashboard and the alert rules under deploy/ ask of the exporter, and a real
Prometheus to ask it of.

`wanted()` reads every PromQL expression (the dashboard's targets, the rules' `expr`) and the
label names its legends and annotations print, so a test can compare them with a scrape.
`Prometheus` runs Debian's `prometheus` binary on a private port and data folder, scraping one
target every second, for one test; `promtool()` finds promtool.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import requests
import yaml

from tests.support.processes import REPO, spawn

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "pipeline.json"
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "alerts.test.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"

# A metric selector: the name, then its matchers if any.
_SELECTOR = re.compile(r"\b(pipeline_[a-z0-9_]+)\b(\{[^}]*\})?")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)")
_TEMPLATE_LABEL = re.compile(r"\{\{\s*(?:\$labels\.)?([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
# Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = {"job", "instance"}


@dataclasses.dataclass(frozen=True)
class Query:
    """One PromQL expression and where it comes from; `shown`: labels its legend or
    annotations print."""

    where: str
    expr: str
    shown: frozenset[str] = frozenset()

    def selectors(self) -> list[tuple[str, set[str]]]:
        """(metric name, label names matched) of each selector in the expression."""
        return [
            (name, set(_MATCHER.findall(body or ""))) for name, body in _SELECTOR.findall(self.expr)
        ]

    def grouping_labels(self) -> set[str]:
        labels: set[str] = set()
        for inside in _GROUPING.findall(self.expr):
            labels |= {part.strip() for part in inside.split(",") if part.strip()}
        return labels


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        if panel.get("type") != "row":
            yield panel


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def wanted() -> list[Query]:
    """Every expression the dashboard and the rules evaluate."""
    queries = []
    for panel in panels():
        for target in panel["targets"]:
            shown = frozenset(_TEMPLATE_LABEL.findall(target.get("legendFormat", "")))
            queries.append(Query(f"panel {panel['title']!r}", target["expr"], shown))
    for rule in rules():
        text = " ".join(str(v) for v in (rule.get("annotations") or {}).values())
        queries.append(
            Query(f"alert {rule['alert']}", rule["expr"], frozenset(_TEMPLATE_LABEL.findall(text)))
        )
    return queries


def promtool() -> str | None:
    return shutil.which("promtool")


class Prometheus:
    """A real Prometheus scraping `target` (host:port) every second, on a private port."""

    def __init__(self, workdir: pathlib.Path, target: str, port: int) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus")
        config = workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {"job_name": "pipeline", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "prometheus.log"
        self.proc = spawn(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            log_path=self.log_path,
            cwd=None,
        )

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; raises on a PromQL error."""
        response = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"{expr!r}: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Any]:
        response = requests.get(
            f"{self.url}/api/v1/query_range",
            params={"query": expr, "start": start, "end": end, "step": step},
            timeout=30,
        )
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"{expr!r}: {body}")
        result: list[Any] = body["data"]["result"]
        return result

    def wait_scraped(self, timeout: float = 30.0) -> None:
        """Until a scrape of the target has landed (pipeline_up has a sample)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.log()}")
            try:
                # Until its storage is open Prometheus answers 503 with a plain-text body.
                ready = requests.get(f"{self.url}/-/ready", timeout=10).status_code == 200
                if ready and self.query("pipeline_up"):
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"no scrape within {timeout:.0f}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
