"""Behind PgBouncer (issue 21): real workers and `pipeline submit --wait` through a private
PgBouncer 1.18 (Debian's) in transaction mode and in session mode, with the plain
configuration of tests/support/pgbouncer.py.

Before issue 21 every connection failed there with "unsupported startup parameter: options".
The workers and the CLI are told what is in between (PIPELINE_DATABASE_POOLER) and where the
database is directly (PIPELINE_DATABASE_DIRECT_URL, for what needs a session).
"""

from __future__ import annotations

import pathlib
import signal
import uuid
from collections.abc import Callable, Iterator

import pytest

from pipeline.reference import sample
from tests.support import pgbouncer
from tests.support.cli_helpers import assert_no_traceback, cli_env, run_cli
from tests.support.workers import Cluster, wait_until

pytestmark = pytest.mark.slow

FILES = 8
LINES = 20


@pytest.fixture(params=["transaction", "session"])
def behind(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, database_url: str, redis_url: str
) -> Iterator[tuple[Cluster, pgbouncer.PgBouncer]]:
    """Two workers (-c 2) connected through a PgBouncer in the mode of the parameter."""
    why = pgbouncer.available()
    if why is not None:
        pytest.skip(why)
    mode = request.param
    with pgbouncer.PgBouncer(database_url, mode=mode, pool_size=10) as bouncer:
        # The test's own looks at the tables go straight to the database.
        cluster = Cluster(tmp_path=tmp_path, database_url=database_url, broker_url=redis_url)
        cluster.reset_tables()
        extra = {
            "PIPELINE_DATABASE_POOLER": mode,
            "PIPELINE_DATABASE_DIRECT_URL": database_url,
        }
        try:
            for _ in range(2):
                cluster.start_worker(
                    concurrency=2,
                    task_modules=None,
                    database_url=bouncer.url(database_url),
                    extra_env=extra,
                )
            yield cluster, bouncer
        except BaseException:
            cluster.print_logs(tail=60)
            print(bouncer.log_text()[-3000:])
            raise
        finally:
            cluster.close()


def test_submit_wait_through_pgbouncer__every_valid_record_lands_once(
    behind: tuple[Cluster, pgbouncer.PgBouncer],
) -> None:
    cluster, bouncer = behind
    folder = cluster.tmp_path / "data"
    paths = sample.make_batch(folder, n_files=FILES, lines_per_file=LINES, seed=21)
    batch = f"b-{uuid.uuid4().hex[:8]}"
    env = cli_env(
        cluster.env(task_modules=None, database_url=bouncer.url(cluster.database_url)),
        PIPELINE_DATABASE_POOLER=bouncer.mode,
        PIPELINE_DATABASE_DIRECT_URL=cluster.database_url,
    )
    result = run_cli(
        "submit", "--glob", f"{folder}/*", "--batch", batch, "--wait", "--timeout", "90", env=env
    )
    assert_no_traceback(result)
    assert result.returncode == 1, result.describe()  # the poison file ends dead, nothing else
    assert f"{FILES} files, {FILES} enqueued" in result.flat_stderr, result.describe()
    rows = cluster.rows(
        "SELECT status, count(*) AS n FROM file_checkpoints WHERE batch_id = :b GROUP BY status",
        b=batch,
    )
    assert {r.status: int(r.n) for r in rows} == {"completed": FILES - 1, "dead": 1}
    # Every valid record once (every 10th sample line is malformed), none twice.
    got = cluster.rows(
        "SELECT file_url, line FROM events WHERE left(file_url, length(:p)) = :p",
        p=folder.absolute().as_uri() + "/",
    )
    assert len(got) == len({tuple(r) for r in got}) == (FILES - 1) * (LINES - LINES // 10)
    # The workers' logs carry no connection failure (the sweep included).
    for proc in cluster.procs:
        assert "unsupported startup parameter" not in proc.log(), proc.log()[-2000:]
        assert "sweep skipped" not in proc.log(), proc.log()[-2000:]
    assert len(paths) == FILES


# -- crashes behind the transaction pooler --------------------------------------------------


@pytest.fixture
def pooled(
    make_cluster: Callable[..., Cluster], database_url: str
) -> Iterator[tuple[Cluster, dict[str, str], str]]:
    """A cluster (lease 3 s) whose workers go through a PgBouncer in transaction mode: the
    cluster, the workers' extra environment and their database URL."""
    why = pgbouncer.available()
    if why is not None:
        pytest.skip(why)
    with pgbouncer.PgBouncer(database_url, mode="transaction", pool_size=10) as bouncer:
        extra = {
            "PIPELINE_DATABASE_POOLER": "transaction",
            "PIPELINE_DATABASE_DIRECT_URL": database_url,
        }
        yield make_cluster(), extra, bouncer.url(database_url)


def test_pool_child_sigkilled_behind_pgbouncer__lost_attempt_then_completed_once(
    pooled: tuple[Cluster, dict[str, str], str],
) -> None:
    cluster, extra, url_via = pooled
    url = "file:///pooled/child?sleep=10&sleep_until=2"
    worker = cluster.start_worker(database_url=url_via, extra_env=extra)
    cluster.send(url)
    row = cluster.wait_claimed(url)
    cluster.wait_in_output_transaction(row.token)
    _, pid = cluster.worker_of(row.processed_by)
    worker.signal_child(pid, signal.SIGKILL)

    row = cluster.wait_status(url, "completed", timeout=cluster.lease + 20)
    history = [(a.attempt, a.outcome, a.error_class) for a in cluster.attempts(url)]
    assert history == [(1, "lost", "WorkerLost"), (2, "completed", None)]
    assert [(s.token, s.attempt) for s in cluster.sink_rows(url)] == [(row.token, 2)]
    assert worker.alive()


def test_frozen_child_behind_pgbouncer__the_takeover_fences_it_off(
    pooled: tuple[Cluster, dict[str, str], str],
) -> None:
    """pipeline_fence_v1 ends the zombie's server session by the name its output transaction
    set (transaction-local, so it travels with the transaction, not the client)."""
    cluster, extra, url_via = pooled
    url = "file:///pooled/frozen?sleep=10&sleep_until=2"
    for _ in range(2):
        cluster.start_worker(database_url=url_via, extra_env=extra)
    cluster.send(url)
    first = cluster.wait_claimed(url)
    zombie_worker, zombie_pid = cluster.worker_of(first.processed_by)
    cluster.wait_in_output_transaction(first.token)

    zombie_worker.signal_child(zombie_pid, signal.SIGSTOP)
    try:
        done = cluster.wait_status(url, "completed", timeout=cluster.lease + 20)
        cluster.wait_sql(
            "SELECT count(*) = 0 FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = :n",
            timeout=5,
            what="the zombie's session to be ended",
            n=f"pipeline-claim:{first.token}",
        )
    finally:
        zombie_worker.signal_child(zombie_pid, signal.SIGCONT)
    zombie_task = cluster.attempts(url)[0].task_id
    wait_until(
        lambda: f"[{zombie_task}] succeeded" in zombie_worker.log(),
        timeout=30,
        what="the zombie's task to end",
    )
    assert [(a.attempt, a.outcome) for a in cluster.attempts(url)] == [
        (1, "lost"),
        (2, "completed"),
    ]
    assert [(s.token, s.attempt) for s in cluster.sink_rows(url)] == [(done.token, 2)]
