"""How many Postgres connections a worker holds, busy and idle (issue 21, item 2).

Measured with pg_stat_activity: the backends whose client port is a socket of the worker's
process tree (its main process and its pool processes), sampled while a batch runs and after.
The figures are printed for the README's "Running a fleet"; the assertions hold the README's
formula: busy, at most 2 per pool process (one for its calls and the task's output
transaction, one for its lease keeper's renewals while that transaction is open: they must
commit while it is) and 1 per pool process whose task has no output transaction (the keeper's
renewals take the connection between the task's calls), plus 2 in the main process (the sweep
and the worker heartbeat; the release of a killed child's claim); idle past
PIPELINE_DATABASE_IDLE_SECONDS, at most the main process's one (its sweep runs every few
seconds), the pool processes none.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psutil
import pytest
import sqlalchemy as sa

from tests.support.celery_tasks import outside
from tests.support.workers import Cluster, Proc, wait_until

pytestmark = pytest.mark.slow

CONCURRENCY = 4
FILES = 8
IDLE = 3.0


def _held(cluster: Cluster, worker: Proc) -> dict[str, int]:
    """The worker's connections in pg_stat_activity: of its main process, of its pool
    processes in all, and of the pool process that holds the most."""
    port = sa.make_url(cluster.database_url).port or 5432
    main = psutil.Process(worker.pid)
    ports: dict[int, int] = {}  # client port -> pid
    for proc in [main, *main.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port == port:
                    ports[conn.laddr.port] = proc.pid
        except psutil.NoSuchProcess:
            continue
    rows = cluster.rows(
        "SELECT client_port FROM pg_stat_activity"
        " WHERE datname = current_database() AND client_port = ANY(:ports)",
        ports=list(ports),
    )
    per_pid: dict[int, int] = {}
    for row in rows:
        pid = ports[row.client_port]
        per_pid[pid] = per_pid.get(pid, 0) + 1
    pool = [n for pid, n in per_pid.items() if pid != main.pid]
    return {
        "main": per_pid.get(main.pid, 0),
        "pool": sum(pool),
        "per_pool_process": max(pool, default=0),
    }


def test_connections_of_a_worker__two_per_busy_pool_process_idle_down_to_the_sweeps(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(lease=10.0)
    worker = cluster.start_worker(
        concurrency=CONCURRENCY,
        extra_env={"PIPELINE_DATABASE_IDLE_SECONDS": str(IDLE), "PIPELINE_REAP_INTERVAL": "1"},
    )
    # 4 s each, longer than a third of the lease: the lease keepers renew (their own connections)
    urls = [f"file:///budget/{i}?sleep=4" for i in range(FILES)]
    for url in urls:
        cluster.send(url)
    busy = {"main": 0, "pool": 0, "per_pool_process": 0}
    deadline = time.monotonic() + 60
    while cluster.status_counts().get("completed", 0) < FILES:
        assert time.monotonic() < deadline, cluster.summary()
        now = _held(cluster, worker)
        busy = {k: max(busy[k], now[k]) for k in busy}
        time.sleep(0.1)
    after = _held(cluster, worker)
    wait_until(
        lambda: _held(cluster, worker)["pool"] == 0,
        timeout=IDLE + 10,
        what="the idle pool processes to close their connections",
        describe=lambda: str(_held(cluster, worker)),
    )
    time.sleep(1)
    idle = _held(cluster, worker)
    print(
        f"\n[budget] worker -c {CONCURRENCY}: busy at most {busy} connections; right after the"
        f" batch {after}; idle {IDLE:g} s later {idle}"
    )
    # Its calls and its output transaction share one connection; the lease keeper has its own.
    assert busy["per_pool_process"] <= 2, busy
    assert busy["pool"] <= 2 * CONCURRENCY, busy
    assert busy["main"] <= 2, busy
    assert idle["pool"] == 0, idle
    assert idle["main"] <= 1, idle


def test_connections_of_a_worker__one_per_busy_pool_process_without_an_output_transaction(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(lease=6.0)
    worker = cluster.start_worker(
        concurrency=CONCURRENCY,
        extra_env={"PIPELINE_DATABASE_IDLE_SECONDS": str(IDLE), "PIPELINE_REAP_INTERVAL": "1"},
    )
    # 3 s each: the lease keeper renews once (at 2 s), between the claim and the completion.
    for i in range(FILES):
        cluster.send(f"file:///budget-outside/{i}?sleep=3", task=outside)
    busy = {"main": 0, "pool": 0, "per_pool_process": 0}
    deadline = time.monotonic() + 60
    while cluster.status_counts().get("completed", 0) < FILES:
        assert time.monotonic() < deadline, cluster.summary()
        now = _held(cluster, worker)
        busy = {k: max(busy[k], now[k]) for k in busy}
        time.sleep(0.1)
    renewed = cluster.scalar(
        "SELECT count(*) FROM file_checkpoints WHERE status = 'completed'"
        " AND completed_at - started_at > interval '2.5 seconds'"
    )
    print(
        f"\n[budget] worker -c {CONCURRENCY}, tasks without an output transaction: busy at most"
        f" {busy} connections"
    )
    assert renewed == FILES  # they ran long enough for a renewal
    assert busy["per_pool_process"] == 1, busy
    assert busy["main"] <= 2, busy
