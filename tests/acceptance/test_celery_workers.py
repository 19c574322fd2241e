"""Real `celery worker` subprocesses on real Redis and Postgres: duplicates and crashes."""

from __future__ import annotations

import signal
import time

import pytest

from tests.support import celery_tasks
from tests.support.workers import Cluster, wait_until

pytestmark = pytest.mark.slow


def test_duplicates__each_file_executes_once_across_two_workers(cluster: Cluster) -> None:
    urls = [f"file:///dup/{i:03d}" for i in range(200)]
    cluster.start_worker()
    cluster.start_worker()
    started = time.monotonic()
    for url in urls:
        for _ in range(3):
            cluster.send(url)

    cluster.wait_sql(
        "SELECT count(*) = 200 FROM file_checkpoints WHERE status = 'completed'",
        timeout=60,
        what="200 files completed",
    )
    print(f"\nTIMING duplicates 600 messages / 200 files: {time.monotonic() - started:.1f}s")
    # Attempt rows are made only by a granted claim, and a completed file is never granted
    # again, so these counts are final once every file is completed.
    assert cluster.status_counts() == {"completed": 200}
    assert cluster.scalar("SELECT count(*) FROM file_attempts") == 200
    assert cluster.scalar("SELECT count(*) FROM file_attempts WHERE outcome = 'completed'") == 200
    assert cluster.scalar("SELECT count(*) FROM sink") == 200
    assert cluster.scalar("SELECT count(DISTINCT file_url) FROM sink") == 200
    assert cluster.scalar("SELECT max(attempt) FROM file_checkpoints") == 1


def _recovery(cluster: Cluster, file_url: str, since: object) -> float:
    """Seconds from `since` (database clock) to the file's completed_at."""
    return float(
        cluster.scalar(
            "SELECT extract(epoch FROM completed_at - :t) FROM file_checkpoints"
            " WHERE file_url = :u",
            u=file_url,
            t=since,
        )
    )


def test_pool_child_sigkilled_mid_task__lost_attempt_then_completed_once(
    cluster: Cluster,
) -> None:
    url = "file:///crash/child?sleep=10&sleep_until=2"
    worker = cluster.start_worker()
    cluster.send(url)
    row = cluster.wait_claimed(url)
    cluster.wait_in_output_transaction(row.token)  # its sink row is written, not committed
    owner, pid = cluster.worker_of(row.processed_by)
    assert owner is worker

    worker.signal_child(pid, signal.SIGKILL)
    killed_at = cluster.db_now()

    row = cluster.wait_status(url, "completed", timeout=cluster.lease + 20)
    recovery = _recovery(cluster, url, killed_at)
    print(f"\nRECOVERY child_kill={recovery:.1f}s (lease {cluster.lease:g}s)")
    assert recovery < cluster.lease + 15
    history = [(a.attempt, a.outcome, a.error_class) for a in cluster.attempts(url)]
    assert history == [(1, "lost", "WorkerLost"), (2, "completed", None)]
    sink = cluster.sink_rows(url)
    assert len(sink) == 1
    assert (sink[0].token, sink[0].attempt) == (row.token, 2)
    assert worker.alive(), "the worker's main process survives the loss of a pool child"


def test_whole_worker_sigkilled__other_worker_completes_within_lease(cluster: Cluster) -> None:
    # Redis would hand the dead worker's unacked message back only after visibility_timeout
    # (30 s); the reaper under beat brings the file back as soon as the lease expires.
    url = "file:///crash/worker?sleep=10&sleep_until=2"
    cluster.start_worker()
    cluster.start_worker()
    cluster.start_beat(interval=1)
    cluster.send(url)
    row = cluster.wait_claimed(url)
    cluster.wait_in_output_transaction(row.token)
    victim, _ = cluster.worker_of(row.processed_by)

    victim.signal_group(signal.SIGKILL)
    killed_at = cluster.db_now()

    row = cluster.wait_status(url, "completed", timeout=cluster.lease + 20)
    recovery = _recovery(cluster, url, killed_at)
    print(f"\nRECOVERY worker_kill={recovery:.1f}s (lease {cluster.lease:g}s, reaper every 1s)")
    assert recovery < cluster.lease + 15
    survivor, _ = cluster.worker_of(row.processed_by)
    assert survivor is not victim
    assert not victim.alive()
    history = [(a.attempt, a.outcome) for a in cluster.attempts(url)]
    assert history == [(1, "lost"), (2, "completed")]
    sink = cluster.sink_rows(url)
    assert len(sink) == 1
    assert sink[0].token == row.token


def test_frozen_child_past_its_lease__zombie_writes_do_not_land(cluster: Cluster) -> None:
    url = "file:///crash/frozen?sleep=10&sleep_until=2"
    cluster.start_worker()
    cluster.start_worker()
    cluster.start_beat(interval=1)
    cluster.send(url)
    first = cluster.wait_claimed(url)
    zombie_worker, zombie_pid = cluster.worker_of(first.processed_by)
    # The zombie has inserted its sink row in the output transaction (not committed yet).
    cluster.wait_in_output_transaction(first.token)

    zombie_worker.signal_child(zombie_pid, signal.SIGSTOP)
    try:
        done = cluster.wait_status(url, "completed", timeout=cluster.lease + 20)
        # The takeover ended the frozen process's database session (pipeline_fence_v1).
        cluster.wait_sql(
            "SELECT count(*) = 0 FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = :n",
            timeout=5,
            what="the zombie's session to be ended",
            n=f"pipeline-claim:{first.token}",
        )
    finally:
        zombie_worker.signal_child(zombie_pid, signal.SIGCONT)

    # The woken zombie runs on. Its heartbeat (due at once) learns the claim is gone while its
    # function still sleeps, so it ends by discarding its output: its transaction's session was
    # ended by the takeover and nothing of it commits.
    zombie_task = cluster.attempts(url)[0].task_id
    line = wait_until(
        lambda: next(
            (ln for ln in zombie_worker.log().splitlines() if f"[{zombie_task}] succeeded" in ln),
            None,
        ),
        timeout=30,
        what="the zombie's task to end",
    )
    print(f"\nZOMBIE {line}")
    assert "claim lost to a newer execution; output discarded" in line
    assert done.attempt == 2
    assert cluster.checkpoint(url).token == done.token
    history = [(a.attempt, a.outcome) for a in cluster.attempts(url)]
    assert history == [(1, "lost"), (2, "completed")]
    sink = cluster.sink_rows(url)
    assert [(s.token, s.attempt) for s in sink] == [(done.token, 2)]


def test_task_three_times_its_lease__heartbeat_keeps_the_claim(cluster: Cluster) -> None:
    url = "file:///slow/heartbeat?sleep=9"
    cluster.start_worker()
    cluster.start_worker()
    cluster.start_beat(interval=1)
    cluster.send(url)
    cluster.send(url)  # a duplicate finds the claim busy the whole time

    row = cluster.wait_status(url, "completed", timeout=40)
    assert row.attempt == 1
    history = [(a.attempt, a.outcome) for a in cluster.attempts(url)]
    assert history == [(1, "completed")]
    assert len(cluster.sink_rows(url)) == 1
    assert row.processing_time_ms >= 9000


def test_always_raising_file__dead_after_exactly_three_executions(cluster: Cluster) -> None:
    url = "file:///fail/always?raise=1"
    cluster.start_worker()
    cluster.send(url)

    row = cluster.wait_status(url, "dead", timeout=30)
    assert row.attempt == 3
    assert row.error_message == "boom on attempt 3"
    attempts = cluster.attempts(url)
    assert [(a.attempt, a.outcome, a.error_class) for a in attempts] == [
        (1, "failed", "Boom"),
        (2, "failed", "Boom"),
        (3, "failed", "Boom"),
    ]
    assert [a.error_message for a in attempts] == [f"boom on attempt {n}" for n in (1, 2, 3)]
    assert cluster.sink_rows(url) == []


def test_file_that_kills_its_worker__dead_after_three_lost_attempts(cluster: Cluster) -> None:
    url = "file:///fail/kill?kill=1"
    worker = cluster.start_worker()
    cluster.send(url)

    row = cluster.wait_status(url, "dead", timeout=45)
    assert row.attempt == 3
    assert "worker lost" in row.error_message.lower()
    attempts = cluster.attempts(url)
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "lost"), (2, "lost"), (3, "lost")]
    assert len({a.worker for a in attempts}) == 3, "each attempt ran in a fresh pool process"
    assert cluster.sink_rows(url) == []
    assert worker.alive()


def test_permanent_error__dead_after_one_attempt(cluster: Cluster) -> None:
    url = "file:///fail/permanent?permanent=1"
    cluster.start_worker()
    cluster.send(url)

    row = cluster.wait_status(url, "dead", timeout=30)
    assert row.attempt == 1
    assert row.error_message == f"cannot process {url}"
    assert [(a.attempt, a.outcome, a.error_class) for a in cluster.attempts(url)] == [
        (1, "failed", "PermanentError")
    ]
    assert cluster.sink_rows(url) == []


def test_celery_A_pipeline__runs_the_tasks_of_PIPELINE_TASK_MODULES(cluster: Cluster) -> None:
    from tests.support.celery_tasks import plain

    worker = cluster.start_worker(app="pipeline", task_modules="tests.support.celery_tasks")
    cluster.send("file:///app/pipeline/sink")
    cluster.send("file:///app/pipeline/plain", task=plain)

    sink_row = cluster.wait_status("file:///app/pipeline/sink", "completed", timeout=30)
    plain_row = cluster.wait_status("file:///app/pipeline/plain", "completed", timeout=30)
    assert (sink_row.task_name, plain_row.task_name) == ("tests.sink", "tests.plain")
    assert (plain_row.records_total, plain_row.records_filtered) == (2, 1)
    banner = worker.log()
    assert ". tests.sink" in banner
    assert ". tests.plain" in banner
    assert ". pipeline.reap" in banner


def test_celery_A_user_module__finds_the_app_it_imports_from_pipeline(cluster: Cluster) -> None:
    # No PIPELINE_TASK_MODULES: the module named by -A registers its tasks by being imported,
    # and `celery -A module` finds the app as its attribute `app`.
    worker = cluster.start_worker(app="tests.support.celery_tasks", task_modules=None)
    cluster.send("file:///app/module/sink")

    row = cluster.wait_status("file:///app/module/sink", "completed", timeout=30)
    assert row.attempt == 1
    assert len(cluster.sink_rows("file:///app/module/sink")) == 1
    banner = worker.log()
    assert ".> app:         pipeline:" in banner
    assert ". tests.sink" in banner
    assert ". pipeline.reap" in banner


def test_soft_time_limit__each_attempt_fails_with_the_reason_then_dead(cluster: Cluster) -> None:
    url = "file:///limit/slow?sleep=30"
    cluster.start_worker(concurrency=1)
    cluster.send(url, task=celery_tasks.limited)
    row = cluster.wait_status(url, "dead", timeout=60)
    attempts = cluster.attempts(url)
    assert [(a.outcome, a.error_class) for a in attempts] == [("failed", "TimeLimitExceeded")] * 3
    assert "soft time limit of 1.5 s exceeded" in (row.error_message or "")
    assert cluster.scalar("SELECT count(*) FROM sink") == 0


def test_hard_time_limit__the_killed_attempt_is_released_at_once_and_counted(
    cluster: Cluster,
) -> None:
    url = "file:///limit/hang?hang=1"
    cluster.start_worker(concurrency=1, extra_env={"PIPELINE_REAP_INTERVAL": "1"})
    cluster.send(url, task=celery_tasks.limited)
    row = cluster.wait_status(url, "dead", timeout=90)
    attempts = cluster.attempts(url)
    assert [a.outcome for a in attempts] == ["lost"] * 3
    assert all("died while running" in (a.error_message or "") for a in attempts)
    # Released by the worker when the pool killed the process, not after the lease (30 s).
    spans = [(a.ended_at - a.started_at).total_seconds() for a in attempts]
    assert all(s < 10 for s in spans), spans
    assert "died on attempt 3 of 3" in (row.error_message or "")
