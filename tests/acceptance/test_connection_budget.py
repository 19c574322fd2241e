"""How many Postgres connections a worker holds, busy and idle (issue 21, item 2).

Measured on the worker's side: the worker reaches Postgres through a TCP proxy (one server
connection per client connection, as a direct link; the embedded server of a machine with
nothing running listens on a unix socket only), and the sockets of its process tree (its main
process and its pool processes) connected to the proxy are counted, sampled while a batch runs
and after.
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

import contextlib
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

from tests.support.celery_tasks import outside
from tests.support.processes import tcp_links
from tests.support.tcpproxy import TcpProxy, upstream_of, url_via
from tests.support.workers import Cluster, Proc, wait_until

pytestmark = pytest.mark.slow

CONCURRENCY = 4
FILES = 8
IDLE = 3.0
ENV = {"PIPELINE_DATABASE_IDLE_SECONDS": str(IDLE), "PIPELINE_REAP_INTERVAL": "1"}


def _held(worker: Proc, port: int) -> dict[str, int]:
    """The worker's connections to the database (through the proxy on `port`): of its main
    process, of its pool processes in all, and of the pool process that holds the most."""
    per_pid = {
        pid: n
        for pid, links in tcp_links(worker.pid, port).items()
        if (n := sum(c.status == psutil.CONN_ESTABLISHED for c in links))
    }
    pool = [n for pid, n in per_pid.items() if pid != worker.pid]
    return {
        "main": per_pid.get(worker.pid, 0),
        "pool": sum(pool),
        "per_pool_process": max(pool, default=0),
    }


@contextlib.contextmanager
def _worker_via_proxy(cluster: Cluster, lease_env: dict[str, str]) -> Iterator[tuple[Proc, int]]:
    """A worker of -c CONCURRENCY reaching the database through a TCP proxy; and its port."""
    host, port = upstream_of(cluster.database_url)
    with TcpProxy(upstream_port=port, upstream_host=host) as proxy:
        worker = cluster.start_worker(
            concurrency=CONCURRENCY,
            database_url=url_via(cluster.database_url, proxy.port),
            extra_env=lease_env,
        )
        yield worker, proxy.port


def _busiest(cluster: Cluster, worker: Proc, port: int) -> dict[str, int]:
    """The most connections `_held` saw, figure by figure, until every file completed."""
    busy = {"main": 0, "pool": 0, "per_pool_process": 0}
    deadline = time.monotonic() + 60
    while cluster.status_counts().get("completed", 0) < FILES:
        assert time.monotonic() < deadline, cluster.summary()
        now = _held(worker, port)
        busy = {k: max(busy[k], now[k]) for k in busy}
        time.sleep(0.1)
    return busy


def test_connections_of_a_worker__two_per_busy_pool_process_idle_down_to_the_sweeps(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(lease=10.0)
    with _worker_via_proxy(cluster, ENV) as (worker, port):
        # 4 s each, longer than a third of the lease: the lease keepers renew (their own
        # connections)
        for i in range(FILES):
            cluster.send(f"file:///budget/{i}?sleep=4")
        busy = _busiest(cluster, worker, port)
        after = _held(worker, port)
        wait_until(
            lambda: _held(worker, port)["pool"] == 0,
            timeout=IDLE + 10,
            what="the idle pool processes to close their connections",
            describe=lambda: str(_held(worker, port)),
        )
        time.sleep(1)
        idle = _held(worker, port)
    print(
        f"\n[budget] worker -c {CONCURRENCY}: busy at most {busy} connections; right after the"
        f" batch {after}; idle {IDLE:g} s later {idle}"
    )
    # Its calls and its output transaction share one connection; the lease keeper has its own.
    assert CONCURRENCY <= busy["pool"] <= 2 * CONCURRENCY, busy  # measured, and bounded
    assert busy["per_pool_process"] <= 2, busy
    assert busy["main"] <= 2, busy
    assert idle["pool"] == 0, idle
    assert idle["main"] <= 1, idle


def test_connections_of_a_worker__one_per_busy_pool_process_without_an_output_transaction(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(lease=6.0)
    with _worker_via_proxy(cluster, ENV) as (worker, port):
        # 3 s each: the lease keeper renews once (at 2 s), between the claim and the completion.
        for i in range(FILES):
            cluster.send(f"file:///budget-outside/{i}?sleep=3", task=outside)
        busy = _busiest(cluster, worker, port)
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
