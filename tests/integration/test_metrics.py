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
from tests.support.flower_helpers import pipeline_executable
from tests.support.processes import REPO, free_port
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


def test_metrics__files_by_status_and_by_active_batch_match_the_table(
    filled: PostgresStore, exporter: tuple[int, Any]
) -> None:
    figures = scrape(exporter[0])
    overall = {
        r.status: r.n
        for r in rows(filled, "SELECT status, count(*) AS n FROM file_checkpoints GROUP BY 1")
    }
    for status in STATUSES:
        assert value(figures, "pipeline_files", status=status) == overall.get(status, 0), status
    per_batch = {
        (r.batch_id, r.status): r.n
        for r in rows(
            filled,
            "SELECT batch_id, status, count(*) AS n FROM file_checkpoints"
            " WHERE batch_id IS NOT NULL GROUP BY 1, 2",
        )
    }
    served = {
        (dict(k)["batch"], dict(k)["status"]): v for k, v in figures["pipeline_batch_files"].items()
    }
    # Both batches have a file to go (and finished some in the window); the unbatched files
    # are counted overall only: no empty batch label.
    assert {b for b, _ in served} == {"alpha", "beta"}
    for key, n in served.items():
        assert n == per_batch.get(key, 0), key
    # The scenario, spelled out, so an empty or half-read table cannot pass.
    assert value(figures, "pipeline_batch_files", batch="alpha", status="completed") == 2
    assert value(figures, "pipeline_batch_files", batch="alpha", status="pending") == 1
    assert value(figures, "pipeline_batch_files", batch="beta", status="failed") == 1
    assert value(figures, "pipeline_files", status="processing") == 4
    assert value(figures, "pipeline_active_batches") == 2
    assert value(figures, "pipeline_up") == 1


def test_metrics__batch_eta_is_its_remaining_files_at_its_pace_in_the_window(
    filled: PostgresStore, exporter: tuple[int, Any]
) -> None:
    figures = scrape(exporter[0])
    # alpha: 3 of 5 finished (2 completed, 1 dead) within the last minute: a pace of 3 per
    # minute (the pace is taken over a minute at least), 2 to go: 40 s. beta: 1 of 2, 60 s.
    assert value(figures, "pipeline_batch_eta_seconds", batch="alpha") == pytest.approx(40)
    assert value(figures, "pipeline_batch_eta_seconds", batch="beta") == pytest.approx(60)
    stamp = value(figures, "pipeline_snapshot_timestamp_seconds")
    end = value(figures, "pipeline_batch_estimated_end_timestamp_seconds", batch="alpha")
    assert end == pytest.approx(stamp + 40, abs=0.01)


def test_metrics__batches_beyond_max_batches_are_counted_not_labelled(
    pg_store: PostgresStore,
) -> None:
    for n in range(5):
        pg_store.register([f"file:///data/metrics/many/{n}"], batch_id=f"batch-{n}")
    port = free_port()
    _, stop = metrics.serve(pg_store, port=port, addr="127.0.0.1", interval=3600, max_batches=2)
    try:
        figures = scrape(port)
    finally:
        stop.set()
    assert value(figures, "pipeline_active_batches") == 5
    # the newest names first among batches with nothing finished yet
    assert {dict(k)["batch"] for k in figures["pipeline_batch_files"]} == {"batch-4", "batch-3"}
    assert "pipeline_batch_eta_seconds" not in figures  # no pace yet: no estimate


def test_metrics__dead_expired_and_attempts_in_the_window_match_the_table(
    filled: PostgresStore, exporter: tuple[int, Any]
) -> None:
    figures = scrape(exporter[0])
    dead = filled.scalar("SELECT count(*) FROM file_checkpoints WHERE status = 'dead'")
    expired = filled.scalar(
        "SELECT count(*) FROM file_checkpoints"
        " WHERE status = 'processing' AND lease_expires_at <= now()"
    )
    assert (dead, expired) == (2, 2)
    assert value(figures, "pipeline_window_dead_files") == dead
    assert value(figures, "pipeline_expired_leases") == expired
    assert 0 < value(figures, "pipeline_oldest_expired_lease_age_seconds") < 30
    ended = {
        (r.outcome, r.error_class): r.n
        for r in rows(
            filled,
            "SELECT outcome, coalesce(error_class, '') AS error_class, count(*) AS n"
            " FROM file_attempts WHERE ended_at IS NOT NULL GROUP BY 1, 2",
        )
    }
    assert ended == {
        ("completed", ""): 3,
        ("failed", "Error"): 2,  # the two dead ones (errors given as text)
        ("failed", "RuntimeError"): 1,
        ("lost", "WorkerLost"): 1,
    }
    for (outcome, error_class), n in ended.items():
        assert (
            value(figures, "pipeline_window_attempts", outcome=outcome, error_class=error_class)
            == n
        )
    assert value(figures, "pipeline_window_completed_files") == 3
    assert value(figures, "pipeline_window_records_committed") == 3 * 4
    assert value(figures, "pipeline_window_seconds") == metrics.DEFAULT_WINDOW


def test_metrics__run_time_and_pickup_histograms_count_the_window(
    filled: PostgresStore, exporter: tuple[int, Any]
) -> None:
    figures = scrape(exporter[0])
    # Run times: every ended attempt, by outcome; the buckets are cumulative up to +Inf.
    for outcome, n in (("completed", 3), ("failed", 3), ("lost", 1)):
        assert value(figures, "pipeline_window_run_seconds_gcount", outcome=outcome) == n
        assert value(figures, "pipeline_window_run_seconds_bucket", outcome=outcome, le="+Inf") == n
        served = sorted(
            (float(dict(k)["le"]), v)
            for k, v in figures["pipeline_window_run_seconds_bucket"].items()
            if dict(k)["outcome"] == outcome
        )
        assert [v for _, v in served] == sorted(v for _, v in served)  # cumulative
    # The test ran each in well under 10 s.
    assert value(figures, "pipeline_window_run_seconds_bucket", outcome="completed", le="10.0") == 3
    # Pickup: every file whose first attempt started in the window, running ones included.
    firsts = filled.scalar(
        "SELECT count(DISTINCT file_url) FROM pipeline_attempts WHERE attempt = 1"
    )
    assert firsts == 10
    assert value(figures, "pipeline_window_pickup_latency_seconds_gcount") == firsts
    assert value(figures, "pipeline_window_pickup_latency_seconds_gsum") >= 0


def test_metrics__oldest_pending_failed_and_live_lease_ages(
    filled: PostgresStore, exporter: tuple[int, Any]
) -> None:
    figures = scrape(exporter[0])
    for name, query in (
        (
            "pipeline_oldest_live_lease_age_seconds",
            "SELECT extract(epoch FROM now() - min(started_at)) FROM file_checkpoints"
            " WHERE status = 'processing' AND lease_expires_at > now()",
        ),
        (
            "pipeline_oldest_pending_age_seconds",
            "SELECT extract(epoch FROM now() - min(submitted_at)) FROM file_checkpoints"
            " WHERE status = 'pending'",
        ),
        (
            "pipeline_oldest_failed_age_seconds",
            "SELECT extract(epoch FROM now() - min(a.ended_at)) FROM file_checkpoints c"
            " JOIN file_attempts a ON a.token = c.token WHERE c.status = 'failed'",
        ),
    ):
        age = value(figures, name)
        # The snapshot was read a moment before this query: a little younger, never older.
        assert 0 < age <= float(filled.scalar(query)) + 0.01, name
    completed = filled.scalar(
        "SELECT count(*) FROM file_checkpoints"
        " WHERE status = 'completed' AND completed_at > now() - interval '60 seconds'"
    )
    assert completed == 3
    assert value(figures, "pipeline_completions_per_second") == pytest.approx(completed / 60)


def test_metrics__workers_live_and_heartbeat_age_from_their_heartbeats(
    pg_store: PostgresStore,
) -> None:
    port = free_port()
    collector, stop = metrics.serve(pg_store, port=port, addr="127.0.0.1", interval=3600)
    try:
        figures = scrape(port)
        assert value(figures, "pipeline_workers_live") == 0
        assert "pipeline_worker_heartbeat_age_seconds" not in figures  # none ever seen
        pg_store.worker_seen("celery@a", 11, 5.0)
        pg_store.worker_seen("celery@b", 12, 5.0)
        pg_store.execute_script(  # b's last heartbeat: 20 s ago, past 3 intervals
            "UPDATE pipeline_workers SET seen_at = now() - interval '20 seconds'"
            " WHERE worker = 'celery@b'"
        )
        collector.refresh()
        figures = scrape(port)
        assert value(figures, "pipeline_workers_live") == 1
        assert value(figures, "pipeline_worker_heartbeat_age_seconds") < 5
        pg_store.worker_stopped("celery@a", 11)
        collector.refresh()
        figures = scrape(port)
        assert value(figures, "pipeline_workers_live") == 0
        assert value(figures, "pipeline_worker_heartbeat_age_seconds") >= 20
    finally:
        stop.set()


def test_metrics__no_live_lease_reads_zero_age(pg_store: PostgresStore) -> None:
    done = "file:///data/metrics/only"
    pg_store.complete(done, claim(pg_store, done).token, {"total": 1})
    port = free_port()
    _, stop = metrics.serve(pg_store, port=port, addr="127.0.0.1", interval=3600)
    try:
        figures = scrape(port)
    finally:
        stop.set()
    for name in (
        "pipeline_oldest_live_lease_age_seconds",
        "pipeline_oldest_pending_age_seconds",
        "pipeline_oldest_failed_age_seconds",
        "pipeline_oldest_expired_lease_age_seconds",
        "pipeline_expired_leases",
    ):
        assert value(figures, name) == 0, name
    assert value(figures, "pipeline_files", status="completed") == 1


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
        completed = value(later, "pipeline_files", status="completed")
        assert completed == value(first, "pipeline_files", status="completed") + 1
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
        real = filled.operations

        def broken(**_: Any) -> Any:
            raise RuntimeError("not a PipelineError")

        monkeypatch.setattr(filled, "operations", broken)
        wait_until(
            lambda: value(scrape(port), "pipeline_up") == 0, timeout=10, what="pipeline_up 0"
        )
        stamp = value(scrape(port), "pipeline_snapshot_timestamp_seconds")
        monkeypatch.setattr(filled, "operations", real)
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
    assert value(figures, "pipeline_database_refused", cause="unreachable") == 1


def test_metrics__database_trouble_the_workers_saw_by_cause(filled: PostgresStore) -> None:
    import datetime as dt

    at = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=1)
    filled.record_trouble("disk full", "No space left on device", "w1@h", at, at)
    port = free_port()
    _, stop = metrics.serve(filled, port=port, addr="127.0.0.1", interval=3600)
    try:
        figures = scrape(port)
    finally:
        stop.set()
        filled.execute_script("TRUNCATE pipeline_database_trouble")
    assert value(figures, "pipeline_database_trouble_timestamp_seconds", cause="disk full") == (
        at.timestamp()
    )
    assert "pipeline_database_refused" not in figures


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
        assert value(figures, "pipeline_batch_files", batch="alpha", status="completed") == 2
        assert value(figures, "pipeline_window_dead_files") == 2
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=15)[0].decode()
        assert proc.returncode == 0, output
        assert f"http://127.0.0.1:{port}/metrics" in output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
