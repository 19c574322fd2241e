"""The reference ingest's COPY under a crash, on real `celery worker` subprocesses."""

from __future__ import annotations

import json
import pathlib
import signal

import pytest

from pipeline.reference.task import ingest_file
from tests.support.workers import Cluster

pytestmark = pytest.mark.slow

LINES = 600_000


def test_pool_child_sigkilled_mid_copy__nothing_committed_then_every_line_once(
    cluster: Cluster, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "long.jsonl"
    with path.open("w") as out:
        for n in range(1, LINES + 1):
            row = {"id": f"e{n}", "ts": "2024-03-01T10:00:00Z", "type": "view", "n": n}
            out.write(json.dumps(row) + "\n")
    url = path.as_uri()
    worker = cluster.start_worker(task_modules=None)
    cluster.send(url, task=ingest_file)
    row = cluster.wait_claimed(url)
    # The COPY is running in the claim's output transaction: rows sent, none committed.
    cluster.wait_sql(
        "SELECT count(*) = 1 FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = :n"
        " AND query LIKE 'COPY events%'",
        timeout=20,
        what="the COPY of the first attempt",
        n=f"pipeline-claim:{row.token}",
    )
    _, pid = cluster.worker_of(row.processed_by)

    worker.signal_child(pid, signal.SIGKILL)

    assert cluster.scalar("SELECT count(*) FROM events WHERE file_url = :u", u=url) == 0
    done = cluster.wait_status(url, "completed", timeout=120)
    assert (done.attempt, done.records_total, done.records_persisted) == (2, LINES, LINES)
    history = [(a.attempt, a.outcome) for a in cluster.attempts(url)]
    assert history == [(1, "lost"), (2, "completed")]
    counts = cluster.rows(
        "SELECT count(*) AS n, count(DISTINCT line) AS lines, min(line) AS first,"
        " max(line) AS last FROM events WHERE file_url = :u",
        u=url,
    )[0]
    assert (counts.n, counts.lines, counts.first, counts.last) == (LINES, LINES, 1, LINES)
