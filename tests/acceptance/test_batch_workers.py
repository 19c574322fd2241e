"""Batches on real `celery worker` processes and the real CLI: cancel during a running batch
(no claim starts after `pipeline cancel` returns; running files stop at their chunk; requeue
brings the rest back and each completes once), pause then resume (no attempt spent), and a
concurrency limit that lets a small batch through while a big one runs.

The task is `tests.chunked` (tests/support/celery_tasks.py): chunks of a set length, one sink
row each, numbered.
"""

from __future__ import annotations

import itertools
import time

import pytest

from pipeline.models import BatchSpec
from tests.support.celery_tasks import chunked
from tests.support.cli_helpers import assert_no_traceback, cli_env, run_cli
from tests.support.workers import Cluster, wait_until

pytestmark = pytest.mark.slow

FAST_SWEEP = {"PIPELINE_REAP_INTERVAL": "0.5"}


def submit(cluster: Cluster, name: str, files: list[str], concurrency: int | None = None) -> None:
    """What `pipeline submit` does (its URLs are test:// ones): the batch row, the files, one
    message each."""
    cluster.store.open_batch(BatchSpec(name, task_name="tests.chunked", concurrency=concurrency))
    cluster.store.register(files, batch_id=name, task_name="tests.chunked")
    for url in files:
        cluster.send(url, task=chunked)


def counts(cluster: Cluster, batch: str) -> dict[str, int]:
    rows = cluster.rows(
        "SELECT status, count(*) AS n FROM file_checkpoints WHERE batch_id = :b GROUP BY status",
        b=batch,
    )
    return {r.status: int(r.n) for r in rows}


def lines_per_file(cluster: Cluster, files: list[str]) -> dict[str, list[int]]:
    rows = cluster.rows("SELECT file_url, line FROM sink ORDER BY file_url, line")
    found: dict[str, list[int]] = {u: [] for u in files}
    for r in rows:
        found[r.file_url].append(int(r.line))
    return found


def cli(cluster: Cluster, *args: str) -> str:
    result = run_cli(*args, env=cli_env(cluster.env(task_modules=None)))
    assert_no_traceback(result)
    assert result.returncode == 0, result.describe()
    return result.stdout


def test_cancel__no_claim_after_it_returns_and_requeue_completes_each_file_once(
    cluster: Cluster,
) -> None:
    files = [f"test://cancel/{i:02}?chunks=4&sleep=0.1" for i in range(30)]
    cluster.start_worker(concurrency=2, extra_env=FAST_SWEEP)
    submit(cluster, "cx", files)
    wait_until(
        lambda: counts(cluster, "cx").get("completed", 0) >= 3, timeout=60, what="3 completions"
    )
    out = cli(cluster, "cancel", "--batch", "cx")
    after = cluster.db_now()
    assert "cancelled batch cx" in out
    # Running files stop at their next chunk (or finish): nothing stays processing.
    wait_until(
        lambda: "processing" not in counts(cluster, "cx"), timeout=30, what="running files stopped"
    )
    time.sleep(1.0)  # the messages still queued are refused now, not run
    late = cluster.scalar(
        "SELECT count(*) FROM pipeline_attempts a JOIN file_checkpoints c USING (file_url)"
        " WHERE c.batch_id = 'cx' AND a.started_at > :t",
        t=after,
    )
    assert late == 0
    before = counts(cluster, "cx")
    assert before.get("cancelled", 0) > 0, before
    assert set(before) <= {"completed", "cancelled"}, before

    assert "requeued" in cli(cluster, "requeue", "--batch", "cx")
    wait_until(
        lambda: counts(cluster, "cx") == {"completed": 30}, timeout=90, what="all 30 completed"
    )
    # Each file's chunks landed once: a file stopped at a chunk resumed after it.
    assert lines_per_file(cluster, files) == {u: [1, 2, 3, 4] for u in files}


def test_pause_then_resume__no_attempt_spent_and_everything_completes_once(
    cluster: Cluster,
) -> None:
    files = [f"test://pause/{i:02}?chunks=2&sleep=0.05" for i in range(20)]
    cluster.start_worker(concurrency=2, extra_env=FAST_SWEEP)
    cli_run = cluster.store.open_batch(BatchSpec("px", task_name="tests.chunked"))
    assert cli_run.value == "open"
    assert "paused batch px" in cli(cluster, "pause", "--batch", "px")
    submit(cluster, "px", files)
    # Every message is delivered and refused: nothing is claimed while paused.
    wait_until(lambda: cluster.queue_length() == 0, timeout=30, what="queue drained")
    time.sleep(2.0)
    assert counts(cluster, "px") == {"pending": 20}
    assert cluster.scalar("SELECT count(*) FROM pipeline_attempts") == 0

    assert "20 files enqueued" in cli(cluster, "resume", "--batch", "px")
    wait_until(
        lambda: counts(cluster, "px") == {"completed": 20}, timeout=60, what="all 20 completed"
    )
    rows = cluster.rows("SELECT attempt, attempts_spent FROM file_checkpoints")
    assert {(r.attempt, r.attempts_spent) for r in rows} == {(1, 0)}
    assert lines_per_file(cluster, files) == {u: [1, 2] for u in files}


def test_concurrency_limit__a_small_batch_after_a_big_one_finishes_while_the_big_one_runs(
    cluster: Cluster,
) -> None:
    big = [f"test://big/{i:02}?chunks=3&sleep=0.1" for i in range(15)]
    small = [f"test://small/{i}?chunks=1" for i in range(3)]
    cluster.start_worker(concurrency=3, extra_env=FAST_SWEEP)
    submit(cluster, "big", big, concurrency=1)
    submit(cluster, "small", small)
    wait_until(
        lambda: counts(cluster, "small") == {"completed": 3}, timeout=60, what="small batch done"
    )
    # The big batch, one file at a time, is far from done when the small one is.
    assert counts(cluster, "big").get("completed", 0) < len(big)
    wait_until(
        lambda: counts(cluster, "big") == {"completed": 15}, timeout=90, what="big batch done"
    )
    # Its attempts never overlapped: at most 1 running at once, as limited.
    spans = cluster.rows(
        "SELECT a.started_at, a.ended_at FROM pipeline_attempts a"
        " JOIN file_checkpoints c USING (file_url) WHERE c.batch_id = 'big'"
        " ORDER BY a.started_at"
    )
    assert len(spans) == 15
    for before, after in itertools.pairwise(spans):
        assert after.started_at >= before.ended_at
