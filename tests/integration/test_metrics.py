"""The Prometheus exporter: its figures match the checkpoint table, and a scrape costs no query.

The table is filled through the store (register, claim, complete, fail, lease expiry), the
exporter runs in this process on a free port, and /metrics is read over HTTP and parsed with
prometheus_client's own parser, as Prometheus would.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from pipeline.models import Claim
from pipeline.ops import metrics
from pipeline.store.postgres import PostgresStore
from tests.support.flower_helpers import REPO, pipeline_executable
from tests.support.tcpproxy import free_port
from tests.support.workers import wait_until

LEASE = 600.0
STATUSES = ("pending", "processing", "completed", "failed", "dead")
Figures = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(port: int) -> Figures:
    """GET /metrics and parse it: {metric name: {sorted label pairs: value}}."""
    response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    response.raise_for_status()
    figures: Figures = collections.defaultdict(dict)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            figures[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return figures


def value(figures: Figures, name: str, **labels: str) -> float:
    return figures[name][tuple(sorted(labels.items()))]


def claim(store: PostgresStore, url: str, worker: str = "metrics-test@host:1") -> Claim:
    result = store.claim(url, worker, LEASE)
    assert isinstance(result, Claim), result
    return result


def expire(store: PostgresStore, url: str) -> None:
    n = store.scalar(
        "WITH u AS (UPDATE file_checkpoints SET lease_expires_at = now() - interval '1 second'"
        " WHERE file_url = :u RETURNING 1) SELECT count(*) FROM u",
        {"u": url},
    )
    assert n == 1, url


def rows(store: PostgresStore, query: str) -> list[Any]:
    with store._engine.connect() as conn:
        return list(conn.execute(sa.text(query)))


@pytest.fixture
def filled(pg_store: PostgresStore) -> PostgresStore:
    """Two batches and some unbatched claims, in every state the metrics report."""
    b = "file:///data/metrics"
    pg_store.register([f"{b}/a1", f"{b}/a2", f"{b}/a3", f"{b}/a4", f"{b}/a5"], batch_id="alpha")
    pg_store.register([f"{b}/b1", f"{b}/b2"], batch_id="beta")
    for url in (f"{b}/a1", f"{b}/a2", f"{b}/b1"):  # completed
        pg_store.complete(url, claim(pg_store, url).token, {"total": 5, "persisted": 4})
    for url in (f"{b}/a3", f"{b}/x1"):  # dead: one batched, one claimed without a submit
        result = pg_store.fail(url, claim(pg_store, url).token, "bad bytes", retryable=False)
        assert result.status == "dead", result
    failed = pg_store.fail(f"{b}/b2", claim(pg_store, f"{b}/b2").token, RuntimeError("again"))
    assert failed.status == "failed", failed
    for url in (f"{b}/a4", f"{b}/x2"):  # processing, lease expired: waiting for the reaper
        claim(pg_store, url)
        expire(pg_store, url)
    claim(pg_store, f"{b}/x3")  # processing with a live lease
    claim(pg_store, f"{b}/x4", "crashed@host:2")  # taken over: its first attempt was lost
    expire(pg_store, f"{b}/x4")
    claim(pg_store, f"{b}/x4", "rescuer@host:3")
    return pg_store  # a5 stays pending


@pytest.fixture
def exporter(filled: PostgresStore) -> Iterator[tuple[int, metrics.CheckpointCollector]]:
    port = free_port()
    collector, stop = metrics.serve(filled, port=port, addr="127.0.0.1", interval=0.2)
    yield port, collector
    stop.set()


def test_metrics__files_by_batch_and_status_match_the_table(
    filled: PostgresStore, exporter: tuple[int, Any]
) -> None:
    figures = scrape(exporter[0])
    table = {
        (r.batch, r.status): r.n
        for r in rows(
            filled,
            "SELECT coalesce(batch_id, '') AS batch, status, count(*) AS n"
            " FROM file_checkpoints GROUP BY 1, 2",
        )
    }
    served = {
        (dict(k)["batch"], dict(k)["status"]): v for k, v in figures["pipeline_files"].items()
    }
    assert {b for b, _ in served} == {"alpha", "beta", ""}
    for batch in ("alpha", "beta", ""):
        for status in STATUSES:
            assert served[(batch, status)] == table.get((batch, status), 0), (batch, status)
    # The scenario, spelled out, so an empty or half-read table cannot pass.
    assert value(figures, "pipeline_files", batch="alpha", status="completed") == 2
    assert value(figures, "pipeline_files", batch="alpha", status="pending") == 1
    assert value(figures, "pipeline_files", batch="beta", status="failed") == 1
    assert value(figures, "pipeline_files", batch="", status="processing") == 3
    assert value(figures, "pipeline_up") == 1


def test_metrics__dead_expired_and_attempts_match_the_table(
    filled: PostgresStore, exporter: tuple[int, Any]
) -> None:
    figures = scrape(exporter[0])
    dead = filled.scalar("SELECT count(*) FROM file_checkpoints WHERE status = 'dead'")
    expired = filled.scalar(
        "SELECT count(*) FROM file_checkpoints"
        " WHERE status = 'processing' AND lease_expires_at <= now()"
    )
    assert (dead, expired) == (2, 2)
    assert value(figures, "pipeline_dead_files") == dead
    assert value(figures, "pipeline_expired_leases") == expired
    outcomes = {
        r.outcome: r.n
        for r in rows(filled, "SELECT outcome, count(*) AS n FROM pipeline_attempts GROUP BY 1")
    }
    assert outcomes == {"completed": 3, "failed": 3, "running": 4, "lost": 1}
    for outcome, n in outcomes.items():
        assert value(figures, "pipeline_attempts", outcome=outcome) == n, outcome


def test_metrics__oldest_live_lease_and_completion_rate(
    filled: PostgresStore, exporter: tuple[int, Any]
) -> None:
    figures = scrape(exporter[0])
    age = value(figures, "pipeline_oldest_live_lease_age_seconds")
    now_age = filled.scalar(
        "SELECT extract(epoch FROM now() - min(started_at)) FROM file_checkpoints"
        " WHERE status = 'processing' AND lease_expires_at > now()"
    )
    # The snapshot was read a moment before this query: a little younger, never older.
    assert 0 < age <= float(now_age) + 0.01
    completed = filled.scalar(
        "SELECT count(*) FROM file_checkpoints"
        " WHERE status = 'completed' AND completed_at > now() - interval '60 seconds'"
    )
    assert completed == 3
    assert value(figures, "pipeline_completions_per_second") == pytest.approx(completed / 60)


def test_metrics__no_live_lease_reads_zero_age(pg_store: PostgresStore) -> None:
    done = "file:///data/metrics/only"
    pg_store.complete(done, claim(pg_store, done).token, {"total": 1})
    port = free_port()
    _, stop = metrics.serve(pg_store, port=port, addr="127.0.0.1", interval=3600)
    try:
        figures = scrape(port)
    finally:
        stop.set()
    assert value(figures, "pipeline_oldest_live_lease_age_seconds") == 0
    assert value(figures, "pipeline_expired_leases") == 0
    assert value(figures, "pipeline_files", batch="", status="completed") == 1


def test_metrics__scrapes_serve_the_snapshot_without_querying(
    filled: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every query of the store goes through _fast (its psycopg path); count them there. If
    # queries ever went another way, "the first refresh read nothing" below fails loudly.
    statements: list[str] = []
    real = filled._fast

    def counting(name: str, params: Any) -> Any:
        statements.append(name)
        return real(name, params)

    monkeypatch.setattr(filled, "_fast", counting)
    port = free_port()
    # No background refresh during the test: only the one serve() takes at start.
    collector, stop = metrics.serve(filled, port=port, addr="127.0.0.1", interval=3600)
    try:
        after_start = len(statements)
        assert after_start > 0, "the first refresh read nothing"
        first = scrape(port)
        for _ in range(20):
            assert scrape(port) == first
        assert len(statements) == after_start, statements[after_start:]

        # A change in the table shows only after the next refresh.
        new = "file:///data/metrics/late"
        filled.complete(new, claim(filled, new).token, {"total": 1})
        before_refresh = len(statements)
        assert scrape(port) == first
        collector.refresh()
        assert len(statements) > before_refresh
        later = scrape(port)
        completed = value(later, "pipeline_files", batch="", status="completed")
        assert completed == value(first, "pipeline_files", batch="", status="completed") + 1
        assert value(later, "pipeline_snapshot_timestamp_seconds") > value(
            first, "pipeline_snapshot_timestamp_seconds"
        )
    finally:
        stop.set()


def test_metrics__refresh_survives_an_unexpected_error(
    filled: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error the store does not translate must not stop the refresh thread for good."""
    port = free_port()
    _, stop = metrics.serve(filled, port=port, addr="127.0.0.1", interval=0.1)
    try:
        real = filled.attempt_outcomes

        def broken() -> dict[str, int]:
            raise RuntimeError("not a PipelineError")

        monkeypatch.setattr(filled, "attempt_outcomes", broken)
        wait_until(
            lambda: value(scrape(port), "pipeline_up") == 0, timeout=10, what="pipeline_up 0"
        )
        stamp = value(scrape(port), "pipeline_snapshot_timestamp_seconds")
        monkeypatch.setattr(filled, "attempt_outcomes", real)
        wait_until(
            lambda: (
                value(scrape(port), "pipeline_up") == 1
                and value(scrape(port), "pipeline_snapshot_timestamp_seconds") > stamp
            ),
            timeout=10,
            what="the refresh to recover",
        )
    finally:
        stop.set()


def test_metrics__unreachable_database_reads_down() -> None:
    nowhere = PostgresStore(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none")
    port = free_port()
    _, stop = metrics.serve(nowhere, port=port, addr="127.0.0.1", interval=3600)
    try:
        figures = scrape(port)
    finally:
        stop.set()
        nowhere.close()
    assert value(figures, "pipeline_up") == 0
    assert "pipeline_files" not in figures  # no figures rather than made-up zeros


def test_metrics_cli__serves_the_table_and_stops_on_sigterm(
    filled: PostgresStore, database_url: str
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env["PIPELINE_DATABASE_URL"] = database_url
    argv = [pipeline_executable(), "metrics", "--port", str(port), "--addr", "127.0.0.1"]
    proc = subprocess.Popen(
        [*argv, "--interval", "0.5"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def served() -> Figures | None:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                return scrape(port)
            except requests.ConnectionError:
                return None

        figures = wait_until(served, timeout=30, what=f"`pipeline metrics` on port {port}")
        assert value(figures, "pipeline_up") == 1
        assert value(figures, "pipeline_files", batch="alpha", status="completed") == 2
        assert value(figures, "pipeline_dead_files") == 2
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=15)[0].decode()
        assert proc.returncode == 0, output
        assert f"http://127.0.0.1:{port}/metrics" in output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
