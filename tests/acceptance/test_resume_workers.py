"""Resume inside a file on real `celery worker` processes: a fleet that keeps being preempted
still finishes a long file, a file that kills its worker before any chunk is still dead after
its attempts, and a zombie's chunk lands nothing.

The task is `tests.chunked` (tests/support/celery_tasks.py): chunks of a set length, one sink
row each, numbered; its cap is 2 attempts, its lease the cluster's.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Callable

import pytest

from tests.support.celery_tasks import chunked
from tests.support.workers import Cluster, wait_until

pytestmark = pytest.mark.slow

FAST_SWEEP = {"PIPELINE_REAP_INTERVAL": "0.5"}


def lines(cluster: Cluster, file_url: str) -> list[int]:
    return [
        int(r.line)
        for r in cluster.rows("SELECT line FROM sink WHERE file_url = :u ORDER BY line", u=file_url)
    ]


def test_preempted_fleet__a_file_three_times_longer_than_the_interval_completes(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(lease=2.0)
    # 12 chunks of 0.5 s: 6 s of work. The whole worker is SIGKILLed 2 s into each attempt
    # and a new one started: every attempt is lost. Without resume, the cap of 2 lost
    # attempts would make the file dead; with it, each lost attempt that committed a chunk
    # spends none and the next starts where it stopped.
    file_url = "test://preempted/a?chunks=12&sleep=0.5"
    worker = cluster.start_worker(concurrency=1, extra_env=FAST_SWEEP)
    cluster.send(file_url, task=chunked)
    kills, killed_attempt = 0, 0
    deadline = time.monotonic() + 100
    while time.monotonic() < deadline:
        row = cluster.checkpoint(file_url)
        if row is not None and row.status == "completed":
            break
        # A new attempt under way (the killed one's row stays processing until the sweep
        # hands it on): let it work for the interval, then preempt the whole worker.
        if row is not None and row.status == "processing" and row.attempt > killed_attempt:
            time.sleep(2.0)
            if (cluster.checkpoint(file_url) or row).status == "completed":
                break
            worker.kill()
            kills, killed_attempt = kills + 1, row.attempt
            worker = cluster.start_worker(concurrency=1, extra_env=FAST_SWEEP)
        else:
            time.sleep(0.1)
    done = cluster.wait_status(file_url, "completed", timeout=5)
    assert lines(cluster, file_url) == list(range(1, 13))
    history = cluster.attempts(file_url)
    lost = [a for a in history if a.outcome == "lost"]
    assert kills >= 2
    assert len(lost) >= 2  # as many as the cap: today's rule would have made it dead
    assert all(a.chunks > 0 for a in lost), [(a.attempt, a.chunks) for a in history]
    # Each attempt started where the one before it stopped.
    for before, after in itertools.pairwise(history):
        assert after.start_position == before.end_position
    assert (done.attempts_spent, len(history)) == (0, kills + 1)


def test_file_that_kills_its_worker_before_any_chunk__dead_after_exactly_its_attempts(
    cluster: Cluster,
) -> None:
    file_url = "test://preempted/killer?chunks=3&kill_before=1"
    cluster.start_worker(concurrency=1, extra_env=FAST_SWEEP)
    cluster.send(file_url, task=chunked)
    dead = cluster.wait_status(file_url, "dead", timeout=60)
    assert (dead.attempt, dead.attempts_spent) == (2, 2)
    assert [a.outcome for a in cluster.attempts(file_url)] == ["lost", "lost"]
    assert lines(cluster, file_url) == []


def test_zombie_frozen_mid_chunk__its_chunk_lands_nothing_and_each_chunk_lands_once(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(lease=2.0)
    file_url = "test://zombie/a?chunks=6&sleep=1"
    first = cluster.start_worker(concurrency=1, extra_env=FAST_SWEEP)
    cluster.send(file_url, task=chunked)
    # Frozen inside its third chunk (two committed), past its lease.
    cluster.wait_sql(
        "SELECT position = '2'::jsonb FROM file_checkpoints WHERE file_url = :u",
        timeout=30,
        what="two chunks committed",
        u=file_url,
    )
    row = cluster.checkpoint(file_url)
    assert row is not None
    _, pid = cluster.worker_of(row.processed_by)
    first.signal_child(pid, signal.SIGSTOP)
    try:
        cluster.start_worker(concurrency=1, extra_env=FAST_SWEEP)
        taken = cluster.wait_claimed(file_url, attempt=2, timeout=30)
        assert taken.token != row.token
        cluster.wait_status(file_url, "completed", timeout=60)
    finally:
        first.signal_child(pid, signal.SIGCONT)
    # The zombie wakes inside its chunk: its commit (or its session, ended by the takeover)
    # fails; nothing of it lands.
    wait_until(lambda: "output discarded" in first.log(), timeout=30, what="the zombie to give up")
    assert lines(cluster, file_url) == [1, 2, 3, 4, 5, 6]
    zombie_rows = cluster.rows(
        "SELECT count(*) AS n FROM sink WHERE file_url = :u AND token = :t",
        u=file_url,
        t=row.token,
    )
    assert zombie_rows[0].n == 2  # its first two chunks, committed before it froze
