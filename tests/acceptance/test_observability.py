"""The dashboard and the alert rules against what the exporter really serves, after a real
batch on real workers (one file dead), and against a real Prometheus scraping it.

Every metric name the dashboard's panels and the rules' expressions select, and every label
they match, group by or print, must be one the exporter serves (names and labels compared with
the scrape). Where Debian's `prometheus` is installed, it scrapes the exporter and evaluates
every panel's query (each returns data) and every rule's expression (the dead file fires
PipelineFilesDead, and nothing else fires on a healthy stack).
"""

from __future__ import annotations

import collections
import pathlib
import shutil

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from pipeline.ops import metrics
from tests.support import promql
from tests.support.processes import free_port
from tests.support.workers import Cluster

pytestmark = pytest.mark.slow

BATCH = "obs-batch"


def served_labels(port: int) -> dict[str, set[str]]:
    """{sample name: its label names} from one scrape, parsed as Prometheus would."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    labels: dict[str, set[str]] = collections.defaultdict(set)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels[sample.name] |= set(sample.labels)
    return labels


def run_batch(cluster: Cluster) -> None:
    cluster.start_worker()
    urls = [f"file:///obs/{i}.csv" for i in range(4)] + ["file:///obs/poison.csv?permanent=1"]
    cluster.store.register(urls, batch_id=BATCH)  # as submit does: submit times, one batch
    for url in urls:
        cluster.send(url)
    cluster.wait_all_terminal(len(urls), timeout=60)
    assert cluster.status_counts() == {"completed": 4, "dead": 1}


def test_dashboard_and_rules__select_only_what_the_exporter_serves_after_a_real_batch(
    cluster: Cluster, tmp_path: pathlib.Path
) -> None:
    run_batch(cluster)
    port = free_port()
    _, stop = metrics.serve(cluster.store, port=port, addr="127.0.0.1", interval=0.5)
    try:
        served = served_labels(port)
        problems = []
        for query in promql.wanted():
            labels_here: set[str] = set()
            for name, matched in query.selectors():
                if name not in served:
                    problems.append(f"{query.where}: {name} is not served")
                    continue
                labels_here |= served[name]
                if not matched <= served[name]:
                    problems.append(f"{query.where}: {name} has no {matched - served[name]}")
            # by / on labels and those a legend or annotation prints: on one of its metrics
            # (`on()` and `by (le)` included), or added by Prometheus to every series
            missing = (query.grouping_labels() | query.shown) - labels_here - promql.TARGET_LABELS
            if missing:
                problems.append(f"{query.where}: labels {missing} on none of its metrics")
        assert problems == [], "\n".join(problems)
        # The scrape shows the batch as it ran: the names above are not served empty.
        assert {"batch", "status"} <= served["pipeline_batch_files"]
        assert {"outcome", "error_class"} <= served["pipeline_window_attempts"]

        if shutil.which("prometheus") is None:
            pytest.skip("the name check passed; no `prometheus` here to scrape and query")
        server = promql.Prometheus(tmp_path, f"127.0.0.1:{port}", free_port())
        try:
            server.wait_scraped()
            for query in promql.wanted():
                result = server.query(query.expr)  # raises on a PromQL error
                if query.where.startswith("panel"):
                    assert result, f"{query.where}: {query.expr} returned no data"
            firing = {rule["alert"] for rule in promql.rules() if server.query(rule["expr"])}
            # one dead file in the window; workers up, nothing old, no lease left expired
            assert firing == {"PipelineFilesDead"}, firing
            (dead,) = server.query("pipeline_window_dead_files")
            assert float(dead["value"][1]) == 1
        finally:
            server.close()
    finally:
        stop.set()
