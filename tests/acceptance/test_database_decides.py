"""Postgres decides, the broker only delivers (the README section of that name), both brokers.

Real `celery worker` subprocesses, real SIGKILL, a private PostgreSQL restarted with
`pg_ctl`, a TCP proxy cutting the database away for minutes. Deliveries are counted from the
workers' `Task ...[id] received` lines; starts of the function from the test task's
`SINK-START` lines; effects from the `sink` table (written in the checkpoint transaction).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

import pipeline
from pipeline.worker import celery_app
from tests.support import celery_tasks
from tests.support.brokers import unacked_on_rabbitmq
from tests.support.pgcluster import PgCluster, private_cluster
from tests.support.tcpproxy import TcpProxy, upstream_of, url_via
from tests.support.workers import Cluster, drop_queue_keys, running_cluster, wait_until

pytestmark = pytest.mark.slow

# The sweep runs inside every worker; in these tests every second.
FAST_SWEEP = {"PIPELINE_REAP_INTERVAL": "1"}


def _starts(cluster: Cluster, url: str) -> list[str]:
    """The SINK-START lines of `url` in every worker log (one per start of the function)."""
    lines = []
    for proc in cluster.procs:
        lines += [ln for ln in proc.log().splitlines() if f"SINK-START {url} " in ln]
    return lines


def _task_id(result: object) -> str:
    return str(result.id)  # type: ignore[attr-defined]


# -- a long file costs O(1) messages ----------------------------------------------------------


def test_long_file__twenty_leases_long_costs_one_delivery_and_blocks_nobody(
    make_cluster: Callable[..., Cluster], broker_url: str
) -> None:
    cluster = make_cluster(lease=1.0, broker_url=broker_url)
    cluster.start_worker(concurrency=2, extra_env=FAST_SWEEP)
    long_url = "file:///long/a?sleep=20"
    sent = {long_url: _task_id(cluster.send(long_url))}
    cluster.wait_claimed(long_url)
    started = time.monotonic()
    short = [f"file:///long/short-{i}?sleep=1" for i in range(4)]
    sent |= {u: _task_id(cluster.send(u)) for u in short}

    # The other pool process takes the four short files one after another: none waits behind
    # the long one, and no copy of the long one's message takes a process from them.
    cluster.wait_sql(
        "SELECT count(*) = 4 FROM file_checkpoints WHERE status = 'completed'"
        " AND file_url LIKE 'file:///long/short-%'",
        timeout=15,
        what="the short files, while the long one runs",
    )
    short_done = time.monotonic() - started
    cluster.wait_status(long_url, "completed", timeout=40)
    deliveries = cluster.deliveries()
    per_file = {u: deliveries.get(t, 0) for u, t in sent.items()}
    print(
        f"\nLONGFILE {cluster.broker}: deliveries per file {per_file}; "
        f"4 short files done {short_done:.1f}s after they were sent"
    )
    assert all(n <= 2 for n in per_file.values()), per_file
    assert per_file[long_url] == 1, "a running file's message must not be copied"
    assert short_done < 10, "a pool process sat idle while messages waited"
    assert cluster.scalar("SELECT count(*) FROM sink") == 5
    assert cluster.scalar("SELECT max(attempt) FROM file_checkpoints") == 1


def test_long_files__eight_on_four_processes_cost_at_most_sixteen_deliveries(
    make_cluster: Callable[..., Cluster], broker_url: str
) -> None:
    cluster = make_cluster(lease=1.0, broker_url=broker_url)
    cluster.start_worker(concurrency=2, extra_env=FAST_SWEEP)
    cluster.start_worker(concurrency=2, extra_env=FAST_SWEEP)
    urls = [f"file:///long8/{i}?sleep=5" for i in range(8)]
    ids = {_task_id(cluster.send(u)) for u in urls}
    cluster.wait_all_terminal(8, timeout=60)
    deliveries = sum(n for t, n in cluster.deliveries().items() if t in ids)
    print(f"\nLONG8 {cluster.broker}: {deliveries} deliveries for 8 files of 5 leases each")
    assert cluster.status_counts() == {"completed": 8}
    assert deliveries <= 16
    assert cluster.scalar("SELECT count(*) FROM sink") == 8


# -- backoff on the database clock ------------------------------------------------------------


def _attempt_gaps(cluster: Cluster, url: str) -> list[float]:
    """For each retry: seconds between the failed attempt's retry_at and the next start."""
    rows = cluster.rows(
        "SELECT started_at, retry_at FROM file_attempts WHERE file_url = :u ORDER BY attempt",
        u=url,
    )
    return [
        (later.started_at - earlier.retry_at).total_seconds()
        for earlier, later in itertools.pairwise(rows)
    ]


def test_backoff__no_attempt_starts_before_its_retry_is_due_even_with_copies_delivered(
    make_cluster: Callable[..., Cluster], broker_url: str
) -> None:
    cluster = make_cluster(lease=3.0, broker_url=broker_url)
    cluster.start_worker(concurrency=2, extra_env=FAST_SWEEP)
    url = "file:///backoff/a?raise_until=3"
    cluster.send(url, task=celery_tasks.backoff)
    cluster.wait_status(url, "failed", timeout=20)  # the first failure
    # Early copies (a producer resubmitting, a restored message): each costs one claim.
    copies = [_task_id(cluster.send(url, task=celery_tasks.backoff)) for _ in range(3)]
    cluster.wait_status(url, "completed", timeout=60)

    gaps = _attempt_gaps(cluster, url)
    attempts = cluster.attempts(url)
    print(f"\nBACKOFF {cluster.broker}: start minus retry_at per retry {gaps}")
    assert [a.outcome for a in attempts] == ["failed", "failed", "completed"]
    assert len(_starts(cluster, url)) == 3
    assert all(0 <= g < 1.5 for g in gaps), gaps  # never early, and on time to the second
    assert cluster.scalar("SELECT count(*) FROM sink WHERE file_url = :u", u=url) == 1
    deliveries = cluster.deliveries()
    assert all(deliveries.get(c, 0) == 1 for c in copies), "a copy was rescheduled"


def test_backoff__a_lost_retry_message_is_brought_back_by_the_sweep_once_overdue(
    make_cluster: Callable[..., Cluster], broker_url: str
) -> None:
    cluster = make_cluster(lease=3.0, broker_url=broker_url)
    first = cluster.start_worker(concurrency=1, extra_env=FAST_SWEEP)
    url = "file:///backoff/lost?raise_until=2"
    cluster.send(url, task=celery_tasks.backoff)
    cluster.wait_status(url, "failed", timeout=20)  # the first failure
    # Lose the retry message: its worker dies holding it, and the broker's copy is dropped.
    first.kill()
    if cluster.redis is not None:
        drop_queue_keys(cluster.redis, cluster.queue)
    else:
        wait_until(lambda: cluster.queue_length() >= 1, timeout=10, what="the requeued copy")
        with celery_app.app.connection_for_write() as conn:
            conn.default_channel.queue_purge(cluster.queue)
    assert cluster.queue_length() == 0
    cluster.start_worker(concurrency=1, extra_env=FAST_SWEEP)
    cluster.wait_status(url, "completed", timeout=60)

    (gap,) = _attempt_gaps(cluster, url)
    print(f"\nLOSTRETRY {cluster.broker}: attempt 2 started {gap:.1f}s after its retry was due")
    # Never early; late by at most the sweep's overdue margin (5 s), its interval and a start.
    assert 0 <= gap < 5 + 1 + 3
    assert [a.outcome for a in cluster.attempts(url)] == ["failed", "completed"]
    assert cluster.scalar("SELECT count(*) FROM sink WHERE file_url = :u", u=url) == 1


# -- the sweep never waits behind the backlog -------------------------------------------------


@pytest.mark.timeout(360)
def test_worker_sigkilled_behind_a_backlog__file_handed_back_within_the_lease_without_beat(
    make_cluster: Callable[..., Cluster], broker_url: str
) -> None:
    lease = 3.0
    cluster = make_cluster(lease=lease, broker_url=broker_url)
    victim = cluster.start_worker(concurrency=1, extra_env=FAST_SWEEP)
    # Its first attempt sleeps far longer than sending the backlog takes on a slow machine (a
    # 30 s sleep ended before 5,000 messages were sent, on a host that ran Celery at a third of
    # its usual pace); the attempt that takes it over does not sleep.
    url = "file:///backlog/victim?sleep=600&sleep_until=2"
    cluster.send(url)
    cluster.wait_claimed(url)
    survivor = cluster.start_worker(concurrency=2, extra_env=FAST_SWEEP)
    backlog = 5000
    with celery_app.app.producer_or_acquire() as producer:
        for i in range(backlog):
            celery_tasks.plain.apply_async(
                args=[f"file:///backlog/{i:05d}"], queue=cluster.queue, producer=producer
            )
    assert cluster.queue_length() > 1000, "the backlog must be queued when the worker dies"
    assert cluster.checkpoint(url).status == "processing", "the victim must die holding it"

    killed_at = cluster.db_now()
    victim.kill()
    handed_back = cluster.wait_sql(
        "SELECT ended_at FROM file_attempts WHERE file_url = :u AND outcome = 'lost'",
        timeout=lease + 15,
        what="the victim's file handed back",
        u=url,
    )
    queued_then = cluster.queue_length()
    took = (handed_back - killed_at).total_seconds()
    print(
        f"\nBACKLOG {cluster.broker}: handed back {took:.1f}s after the kill "
        f"(lease {lease:g}s), {queued_then} messages still queued"
    )
    assert took <= lease + 5
    assert queued_then > 0, "the backlog drained before the file was handed back"
    # Its new message is queued behind the backlog, so it runs before the batch ends.
    cluster.wait_sql(
        "SELECT status = 'completed' FROM file_checkpoints WHERE file_url = :u",
        timeout=240,
        what="the victim's file completed",
        u=url,
    )
    assert [a.outcome for a in cluster.attempts(url)] == ["lost", "completed"]
    assert cluster.scalar("SELECT count(*) FROM sink WHERE file_url = :u", u=url) == 1
    assert survivor.alive()


# -- a database restart or outage spends no attempt -------------------------------------------


@pytest.fixture
def private_pg() -> Iterator[PgCluster]:
    with private_cluster() as pg:
        yield pg


def _cluster_on(
    request: pytest.FixtureRequest,
    tmp_path: pathlib.Path,
    database_url: str,
    broker_url: str,
    lease: float,
) -> contextlib.AbstractContextManager[Cluster]:
    """A cluster on a database of its own (the schema applied first)."""
    store = pipeline.open_store(database_url)
    store.upgrade()
    store.close()
    return running_cluster(request, tmp_path, database_url, broker_url, lease)


@pytest.mark.timeout(360)
def test_postgres_restarted_three_times_during_one_file__no_attempt_spent(
    request: pytest.FixtureRequest,
    tmp_path: pathlib.Path,
    private_pg: PgCluster,
    broker_url: str,
) -> None:
    database_url = private_pg.create_database(f"restart_{uuid.uuid4().hex[:8]}")
    with _cluster_on(request, tmp_path, database_url, broker_url, lease=5.0) as cluster:
        cluster.start_worker(concurrency=2, extra_env=FAST_SWEEP)
        cluster.start_worker(concurrency=2, extra_env=FAST_SWEEP)
        url = "file:///restart/long?sleep=6"
        cluster.send(url)
        cluster.wait_claimed(url)
        waiting = [f"file:///restart/{i:04d}" for i in range(1000)]

        def send_backlog() -> None:
            with celery_app.app.producer_or_acquire() as producer:
                for u in waiting:
                    celery_tasks.sink.apply_async(args=[u], queue=cluster.queue, producer=producer)

        # Sent beside the restarts, not before them: on a loaded host sending 1000 messages
        # took longer than the long file's first start, which then committed unbroken.
        backlog = threading.Thread(target=send_backlog, name="backlog")
        backlog.start()
        # Each restart hits a different start of the long file: its output transaction is
        # broken every time, and the file carries on, same claim, same attempt.
        for n in range(1, 4):
            wait_until(
                lambda n=n: len(_starts(cluster, url)) >= n,  # type: ignore[misc]
                timeout=60,
                what=f"start {n} of the long file",
            )
            # Restart only once the long file's output transaction is open (its INSERT done,
            # in its sleep): on a loaded host the start's log line can come well before it.
            wait_until(
                lambda: cluster.scalar(_LONG_TRANSACTION_OPEN),
                timeout=30,
                what=f"the output transaction of start {n}",
            )
            private_pg.restart()
        backlog.join(timeout=120)
        assert not backlog.is_alive(), "the backlog was never all sent"
        cluster.wait_all_terminal(1001, timeout=240)
        starts = len(_starts(cluster, url))
        spent = cluster.rows("SELECT file_url, attempt FROM file_checkpoints WHERE attempt <> 1")
        counts = cluster.status_counts()
        print(
            f"\nRESTART {cluster.broker}: 3 restarts; long file started {starts} times in "
            f"attempt 1; statuses {counts}; attempts spent {len(spent)}"
        )
        assert counts == {"completed": 1001}
        assert spent == []
        assert cluster.scalar("SELECT count(*) FROM file_attempts WHERE attempt > 1") == 0
        # The bound stated in the README: at most MAX_STARTS_PER_ATTEMPT starts per attempt.
        from pipeline.worker.outage import MAX_STARTS_PER_ATTEMPT

        assert starts == 4 <= MAX_STARTS_PER_ATTEMPT
        assert cluster.scalar("SELECT count(*) FROM sink") == 1001
        assert cluster.scalar("SELECT count(DISTINCT file_url) FROM sink") == 1001


# The long file's output transaction, open in its sleep: the other files' are open for
# milliseconds only.
_LONG_TRANSACTION_OPEN = (
    "SELECT count(*) > 0 FROM pg_stat_activity WHERE state = 'idle in transaction'"
    " AND query LIKE 'INSERT INTO sink %' AND clock_timestamp() - state_change > '0.5 s'"
)


def _held(cluster: Cluster) -> int:
    """Messages of the test's queue held by workers (reserved, not acked)."""
    if cluster.redis is None:
        return unacked_on_rabbitmq(cluster.broker_url, cluster.queue)
    return sum(1 for _, raw in cluster.redis.hscan_iter("unacked") if cluster.queue.encode() in raw)


@pytest.mark.timeout(400)
def test_postgres_unreachable_for_minutes__deliveries_stay_bounded_and_all_complete(
    make_cluster: Callable[..., Cluster], broker_url: str
) -> None:
    cluster = make_cluster(lease=10.0, broker_url=broker_url)
    # Redis is where step-backs used to multiply (their countdowns crossed the old 30 s
    # visibility timeout, doubling about every minute): 45 s there by default, 20 s on
    # RabbitMQ, to keep the suite short; PIPELINE_TEST_OUTAGE_SECONDS sets
    # both (the figures in the closing note of issue 9 were measured with 120 and 180).
    outage = float(
        os.environ.get("PIPELINE_TEST_OUTAGE_SECONDS") or (45 if cluster.broker == "redis" else 20)
    )
    # the embedded server (offline) is a unix socket folder in the URL's query, not a host
    host, port = upstream_of(cluster.database_url)
    with TcpProxy(upstream_port=port, upstream_host=host) as proxy:
        proxied = url_via(cluster.database_url, proxy.port)
        cluster.start_worker(concurrency=2, database_url=proxied, extra_env=FAST_SWEEP)
        cluster.start_worker(concurrency=2, database_url=proxied, extra_env=FAST_SWEEP)
        running = [f"file:///away/run-{i}?sleep=4" for i in range(4)]
        ids = {_task_id(cluster.send(u)) for u in running}
        for u in running:
            cluster.wait_claimed(u)
        proxy.cut()
        waiting = [f"file:///away/wait-{i:02d}" for i in range(50)]
        ids |= {_task_id(cluster.send(u)) for u in waiting}
        held = [_held(cluster)]
        deadline = time.monotonic() + outage
        while time.monotonic() < deadline:
            time.sleep(min(30.0, max(deadline - time.monotonic(), 0)))
            held.append(_held(cluster))
        proxy.restore()
        cluster.wait_all_terminal(54, timeout=120)

    deliveries = {t: n for t, n in cluster.deliveries().items() if t in ids}
    print(
        f"\nAWAY {cluster.broker} {outage:.0f}s: max deliveries per file "
        f"{max(deliveries.values())}, held messages over time {held}"
    )
    assert cluster.status_counts() == {"completed": 54}
    assert max(deliveries.values()) <= 3
    assert max(held) <= held[0] + 4, "messages held by workers grew during the outage"
    assert cluster.scalar("SELECT count(*) FROM sink") == 54


# -- timestamps are the time of the event -----------------------------------------------------


def test_completed_at__is_when_the_file_completed_and_counts_as_recent_activity(
    cluster: Cluster,
) -> None:
    cluster.start_worker(concurrency=1, extra_env=FAST_SWEEP)
    url = "file:///clock/three?sleep=3"
    cluster.send(url)
    row = cluster.wait_status(url, "completed", timeout=30)
    took = (row.completed_at - row.started_at).total_seconds()
    (attempt,) = cluster.attempts(url)
    ended = (attempt.ended_at - attempt.started_at).total_seconds()
    overview = cluster.store.overview()
    print(f"\nCLOCK completed_at - started_at {took:.2f}s, attempt {ended:.2f}s")
    assert 2.5 <= took <= 3.5
    assert 2.5 <= ended <= 3.5
    assert abs(row.processing_time_ms / 1000 - took) < 0.5
    assert overview.completed_last_minute == 1
