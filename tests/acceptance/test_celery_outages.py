"""Broker and database outages under real `celery worker` subprocesses."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest

from tests.support.tcpproxy import TcpProxy, upstream_of, url_via
from tests.support.workers import Cluster

pytestmark = pytest.mark.slow


def test_redis_flushed_mid_batch__reaper_brings_every_file_to_completed(
    make_cluster: Callable[..., Cluster], private_redis_url: str
) -> None:
    # Not the session's database: this test flushes its broker.
    cluster = make_cluster(broker_url=private_redis_url)
    urls = [f"file:///flush/{i:03d}?sleep=0.3" for i in range(100)]
    cluster.start_worker()
    cluster.start_worker()
    cluster.start_beat(interval=1, waiting_seconds=2)
    # The reaper only knows rows: register the batch first, as `pipeline submit` does.
    cluster.store.register(urls, task_name="tests.sink", batch_id=f"flush-{uuid.uuid4().hex[:6]}")
    for url in urls:
        cluster.send(url)
    cluster.wait_sql(
        "SELECT count(*) >= 10 FROM file_checkpoints WHERE status = 'completed'",
        timeout=30,
        what="the batch to be under way",
    )

    before = cluster.status_counts()
    queued = cluster.queue_length()
    cluster.redis.flushdb()  # this test's own db number only
    flushed_at = cluster.db_now()
    print(f"\nFLUSH with {queued} messages queued; rows then: {before}")
    assert before.get("completed", 0) < 100, "the flush came too late to lose anything"

    cluster.wait_all_terminal(100, timeout=60)
    recovery = cluster.scalar(
        "SELECT extract(epoch FROM max(completed_at) - :t) FROM file_checkpoints", t=flushed_at
    )
    print(f"RECOVERY redis_flush={float(recovery):.1f}s (100 files, reaper every 1s, waiting 2s)")
    assert cluster.status_counts() == {"completed": 100}
    assert cluster.scalar("SELECT count(*) FROM sink") == 100
    assert cluster.scalar("SELECT count(DISTINCT file_url) FROM sink") == 100
    # Losing the broker's messages loses no execution: nothing was retried.
    assert cluster.scalar("SELECT max(attempt) FROM file_checkpoints") == 1
    assert cluster.scalar("SELECT count(*) FROM file_attempts") == 100


# The sweep inside every worker only (no beat), on each broker. (Beat sending pipeline.reap as
# well is covered by the flushed-Redis test above.)
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_postgres_unreachable_mid_batch__all_complete_without_spending_an_attempt(
    request: pytest.FixtureRequest,
    make_cluster: Callable[..., Cluster],
    broker: str,
) -> None:
    # A task whose database goes away waits where it stands (same process, same message) and
    # carries on under the same claim once the database is back; a claim whose reply was lost
    # is resumed by its reserved token. An outage of half the lease spends no attempt.
    lease = 10.0
    broker_url = request.getfixturevalue("redis_url" if broker == "redis" else "rabbitmq_url")
    cluster = make_cluster(lease=lease, broker_url=broker_url)
    host, port = upstream_of(cluster.database_url)
    with TcpProxy(upstream_port=port, upstream_host=host) as proxy:
        proxied_url = url_via(cluster.database_url, proxy.port)
        urls = [f"file:///outage/{i:02d}?sleep=0.2" for i in range(60)]
        cluster.start_worker(database_url=proxied_url)
        cluster.start_worker(database_url=proxied_url)
        for url in urls:
            cluster.send(url)
        cluster.wait_sql(
            "SELECT count(*) >= 10 FROM file_checkpoints WHERE status = 'completed'",
            timeout=30,
            what="the batch to be under way",
        )

        cut = proxy.cut()
        cut_to = cluster.db_now()
        before = cluster.status_counts()
        time.sleep(lease / 2)  # the outage itself
        proxy.restore()
        restored_at = cluster.db_now()
        print(f"\nOUTAGE {lease / 2:g}s on {broker} (lease {lease:g}s): {cut} cut; rows {before}")
        assert before.get("completed", 0) < 60, "the outage came too late to matter"

        cluster.wait_all_terminal(60, timeout=60)
    recovery = cluster.scalar(
        "SELECT extract(epoch FROM max(completed_at) - :t) FROM file_checkpoints", t=restored_at
    )
    # Tasks that met the outage (said once a minute per cause and pool process).
    retried = sum(
        1
        for p in cluster.procs
        if p.kind == "worker"
        for line in p.log().splitlines()
        if "ForkPoolWorker" in line and "database unreachable:" in line
    )
    print(f"RECOVERY db_outage={float(recovery):.1f}s after restore; {retried} waits for the db")
    assert cluster.status_counts() == {"completed": 60}
    assert cluster.scalar("SELECT count(*) FROM sink") == 60
    assert cluster.scalar("SELECT count(DISTINCT file_url) FROM sink") == 60
    # No attempt spent, not even by a claim that committed just as the link was cut and whose
    # reply never came back: its task reserved the token before the call, so its retry
    # resumes that claim instead of waiting for the lease and taking it over as attempt 2.
    spent = cluster.rows("SELECT file_url, attempt FROM file_checkpoints WHERE attempt <> 1")
    history = {
        r.file_url: [(a.attempt, a.outcome) for a in cluster.attempts(r.file_url)] for r in spent
    }
    print(f"SPENT {len(spent)} attempt(s): {history}")
    assert history == {}, "waiting for the database is not an attempt"
    assert cluster.scalar("SELECT count(*) FROM file_attempts") == 60
    assert retried > 0, "the outage hit no task"
    # Tasks caught inside their output transaction by the cut kept attempt 1 across it.
    resumed = cluster.scalar(
        "SELECT count(*) FROM file_checkpoints c"
        "  JOIN file_attempts a ON a.file_url = c.file_url AND a.attempt = 1"
        " WHERE c.attempt = 1 AND a.started_at <= :cut AND c.completed_at >= :restored",
        cut=cut_to,
        restored=restored_at,
    )
    print(f"RESUMED {resumed} claim(s) held across the outage, same attempt")
    assert resumed >= 1, "no task was caught mid-claim: the resume path was not exercised"
