"""Database trouble is never the file's fault (issue 25): a configuration the database
refuses fails at once, visibly; an outage of any length spends no attempt.

Real `pipeline` CLI runs, real `celery worker` subprocesses, private PostgreSQL clusters
stopped, filled or out of connections.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import pipeline
from tests.support.cli_helpers import assert_no_traceback, cli_env, run_cli
from tests.support.fakepg import RefusingServer
from tests.support.pgcluster import PgCluster, private_cluster
from tests.support.workers import Cluster, running_cluster, wait_until

pytestmark = pytest.mark.slow

SECRET = "Pa55-w0rd-x"


def _unknown_database(database_url: str) -> str:
    url = sa.make_url(database_url).set(database="no_such_db_f25", password=SECRET)
    return url.render_as_string(hide_password=False)


@pytest.mark.parametrize("refusal", ["unknown database", "pooler refusing a parameter"])
def test_cli__a_configuration_the_database_refuses_exits_2_at_once_naming_the_setting(
    database_url: str, redis_url: str, tmp_path: object, refusal: str
) -> None:
    with RefusingServer() as fake:
        bad = (
            _unknown_database(database_url)
            if refusal == "unknown database"
            else f"postgresql+psycopg://u:{SECRET}@127.0.0.1:{fake.port}/db"
        )
        env = cli_env(PIPELINE_DATABASE_URL=bad, PIPELINE_BROKER_URL=redis_url)
        for args in (("submit", "file:///data/f25/a.jsonl"), ("status",)):
            started = time.monotonic()
            result = run_cli(*args, env=env, timeout=60)
            took = time.monotonic() - started
            print(f"\n{refusal}: pipeline {' '.join(args)} -> {result.returncode} in {took:.1f}s")
            assert result.returncode == 2, result.describe()
            assert_no_traceback(result)
            assert "PIPELINE_DATABASE_URL" in result.flat_stderr
            assert SECRET not in result.output
            assert "unreachable" not in result.output


def test_worker__a_configuration_the_database_refuses_fails_the_task_at_once(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(lease=3.0)
    worker = cluster.start_worker(database_url=_unknown_database(cluster.database_url))
    urls = [f"file:///f25/misconfigured/{i}" for i in range(6)]
    for url in urls:
        cluster.send(url)
    wait_until(
        lambda: worker.log().count("StoreMisconfigured") >= len(urls),
        timeout=30,
        what="every task to fail on the configuration",
    )
    log = worker.log()
    print(f"\nWORKER log lines naming the configuration: {log.count('PIPELINE_DATABASE_URL')}")
    assert SECRET not in log
    assert "waiting for the database" not in log
    assert 'database "no_such_db_f25" does not exist' in log
    # Failed, not waiting: nothing of ours holds a message.
    assert cluster.queue_length() == 0
    assert worker.alive()


# -- an outage of any length spends no attempt (the gap rule) ---------------------------------

# The sweep inside every worker, every second: the gap rule at 2 s.
FAST_SWEEP = {"PIPELINE_REAP_INTERVAL": "1"}


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
    store = pipeline.open_store(database_url)
    store.upgrade()
    store.close()
    return running_cluster(request, tmp_path, database_url, broker_url, lease)


def _outcomes(cluster: Cluster) -> dict[str, int]:
    rows = cluster.rows("SELECT outcome, count(*) AS n FROM file_attempts GROUP BY outcome")
    return {r.outcome: int(r.n) for r in rows}


@pytest.mark.timeout(240)
def test_postgres_stopped_five_leases__no_attempt_spent_a_worker_killed_meanwhile_taken_over(
    request: pytest.FixtureRequest,
    tmp_path: pathlib.Path,
    private_pg: PgCluster,
    redis_url: str,
) -> None:
    lease = 3.0
    database_url = private_pg.create_database(f"gap_{uuid.uuid4().hex[:8]}")
    with _cluster_on(request, tmp_path, database_url, redis_url, lease=lease) as cluster:
        # Registered first, as `pipeline submit` does: the doomed worker may be killed holding
        # a message it could not claim yet (the database away), which on Redis comes back only
        # after the visibility timeout (an hour); a registered file's row lets the sweep send
        # it again once it has waited PIPELINE_REAP_WAITING_SECONDS (README, "Lost messages").
        env = {**FAST_SWEEP, "PIPELINE_REAP_WAITING_SECONDS": "5"}
        survivors = [cluster.start_worker(concurrency=2, extra_env=env) for _ in range(2)]
        doomed = cluster.start_worker(concurrency=2, extra_env=env)
        urls = [f"file:///gap/{i:02d}?sleep=2" for i in range(30)]
        cluster.store.register(urls, task_name="tests.sink")
        for url in urls:
            cluster.send(url)
        cluster.wait_sql(
            "SELECT count(*) >= 4 FROM file_checkpoints WHERE status = 'completed'",
            timeout=60,
            what="the batch to be under way",
        )
        # The files the doomed worker holds when the database goes.
        node = doomed.name
        cluster.wait_sql(
            f"SELECT count(*) >= 1 FROM file_checkpoints WHERE status = 'processing'"
            f" AND processed_by LIKE '{node}@%'",
            timeout=30,
            what="the doomed worker to hold a file",
        )
        private_pg.stop()
        stopped_at = time.monotonic()
        # The rows the doomed worker holds are read back once the database returns (nobody
        # can change them while it is away).
        time.sleep(lease)
        doomed.kill()  # SIGKILL, main process and pool, while the database is away
        time.sleep(5 * lease - (time.monotonic() - stopped_at))
        private_pg.start()
        outage = time.monotonic() - stopped_at
        held = cluster.rows(
            "SELECT file_url, token FROM file_checkpoints WHERE status = 'processing'"
            " AND processed_by LIKE :node",
            node=f"{node}@%",
        )
        print(f"\nOUTAGE {outage:.1f}s (lease {lease:g}s); the killed worker held {len(held)}")
        assert held, "the killed worker held nothing when the database came back"
        cluster.wait_all_terminal(len(urls), timeout=120)
        counts = cluster.status_counts()
        outcomes = _outcomes(cluster)
        killed = {r.file_url for r in held}
        spent = cluster.rows(
            "SELECT file_url, attempt, attempts_spent FROM file_checkpoints WHERE attempt <> 1"
        )
        gap = cluster.rows("SELECT * FROM pipeline_fleet_contact")
        print(f"STATUS {counts}; attempts by outcome {outcomes}; gap rows {gap}")
        print(f"SPENT {[(r.file_url, r.attempt, r.attempts_spent) for r in spent]}")
        assert counts == {"completed": len(urls)}
        assert cluster.scalar("SELECT count(*) FROM sink") == len(urls)
        assert cluster.scalar("SELECT count(DISTINCT file_url) FROM sink") == len(urls)
        # No attempt spent by the outage: only the killed worker's files have a second one.
        assert {r.file_url for r in spent} == killed
        assert outcomes.get("lost", 0) == len(killed)
        for url in killed:
            assert sorted((a.attempt, a.outcome) for a in cluster.attempts(url)) == [
                (1, "lost"),
                (2, "completed"),
            ]
        assert all(p.alive() for p in survivors)
        assert gap[0].leases_extended >= len(killed)
        status = run_cli("status", env=cli_env(cluster.env(task_modules=None)))
        print(status.stdout)
        assert status.returncode == 0, status.describe()
        assert "database gap: it answered no worker for" in status.stdout
        assert "database trouble: unreachable" in status.stdout


@pytest.mark.timeout(240)
def test_max_connections_exhausted_by_another_client_for_three_leases__no_attempt_spent(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, redis_url: str
) -> None:
    lease = 3.0
    with private_cluster(max_connections=30) as pg:
        database_url = pg.create_database(f"slots_{uuid.uuid4().hex[:8]}")
        admin = f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
        with _cluster_on(request, tmp_path, database_url, redis_url, lease=lease) as cluster:
            workers = [cluster.start_worker(concurrency=2, extra_env=FAST_SWEEP) for _ in range(2)]
            urls = [f"file:///slots/{i:02d}?sleep=1" for i in range(24)]
            for url in urls:
                cluster.send(url)
            cluster.wait_sql(
                "SELECT count(*) >= 4 FROM file_checkpoints WHERE status = 'completed'",
                timeout=60,
                what="the batch to be under way",
            )
            hogs: list[psycopg.Connection[Any]] = []
            try:
                # Every session of the workers ended, and every slot taken by another client
                # before they come back: each of their connects is refused, "too many clients".
                with psycopg.connect(admin, autocommit=True) as conn:
                    conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name = 'pipeline'"
                    )
                with contextlib.suppress(psycopg.OperationalError):
                    while True:
                        hogs.append(psycopg.connect(admin, connect_timeout=5))
                print(f"\nSLOTS all {len(hogs)} free ones taken for {3 * lease:g}s")
                time.sleep(3 * lease)
            finally:
                for hog in hogs:
                    hog.close()
            cluster.wait_all_terminal(len(urls), timeout=120)
            refused = sum(w.log().count("too many clients") for w in workers)
            outcomes = _outcomes(cluster)
            spent = cluster.rows(
                "SELECT file_url, attempt FROM file_checkpoints WHERE attempt <> 1"
            )
            print(f"REFUSED {refused} connects; attempts by outcome {outcomes}; spent {spent}")
            assert refused > 0, "no connect of the workers was refused"
            assert cluster.status_counts() == {"completed": len(urls)}
            assert spent == []
            assert outcomes == {"completed": len(urls)}
            assert cluster.scalar("SELECT count(DISTINCT file_url) FROM sink") == len(urls)
            assert cluster.scalar("SELECT count(*) FROM sink") == len(urls)
            # The operator sees the cause: the workers wrote it once the database answered.
            cluster.wait_sql(
                "SELECT count(*) = 1 FROM pipeline_database_trouble"
                " WHERE cause = 'too many connections'",
                timeout=10,
                what="the trouble to be recorded",
            )
            status = run_cli("status", env=cli_env(cluster.env(task_modules=None)))
            print(status.stdout)
            assert status.returncode == 0, status.describe()
            assert "database trouble: too many connections" in status.stdout
            assert "sorry, too many clients already" in status.stdout


@contextlib.contextmanager
def _small_filesystem(folder: pathlib.Path, megabytes: int) -> Iterator[tuple[pathlib.Path, str]]:
    """A loop-mounted ext4 image of `megabytes` (no blocks reserved for root), or a tmpfs of
    that size where loop devices cannot be used; its mount point and kind."""
    image, mount = folder / "small.img", folder / "mnt"
    mount.mkdir()
    kind = "ext4 on a loop device"
    try:
        with image.open("wb") as handle:
            handle.truncate(megabytes * 1024 * 1024)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    except (OSError, subprocess.CalledProcessError):
        kind = "tmpfs"
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(mount)], check=True
        )
    try:
        yield mount, kind
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(path: pathlib.Path) -> int:
    """Write to `path` until the filesystem is full; the bytes written."""
    block, written = b"\0" * (1 << 20), 0
    with path.open("wb", buffering=0) as handle:
        try:
            while True:
                written += handle.write(block)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
        with contextlib.suppress(OSError):  # the last pieces smaller than a block
            while True:
                written += handle.write(b"\0" * 4096)
    return written


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")
@pytest.mark.timeout(300)
def test_disk_full_for_three_leases__no_attempt_spent_every_output_once(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, redis_url: str
) -> None:
    lease, n_files = 3.0, 80
    folder = pathlib.Path(tempfile.mkdtemp(prefix="pipeline-f25-disk-"))
    folder.chmod(0o755)  # the server may run as another user
    try:
        with private_cluster() as pg, _small_filesystem(folder, 64) as (space, kind):
            if pg.user is not None:
                owner = pwd.getpwnam(pg.user)
                os.chown(space, owner.pw_uid, owner.pw_gid)
            # The database's every table on the small filesystem (WAL stays on the big one).
            name = f"full_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(
                f"postgresql://postgres@127.0.0.1:{pg.port}/postgres", autocommit=True
            ) as conn:
                conn.execute(f"CREATE TABLESPACE small LOCATION '{space}'")
                conn.execute(f'CREATE DATABASE "{name}" TABLESPACE small')
            database_url = f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/{name}"
            with _cluster_on(request, tmp_path, database_url, redis_url, lease=lease) as cluster:
                with cluster.engine.connect() as conn:
                    conn.execute(sa.text("CREATE TABLE sink_fill (file_url text, b text)"))
                workers = [
                    cluster.start_worker(concurrency=2, extra_env=FAST_SWEEP) for _ in range(2)
                ]
                urls = [f"file:///full/{i:03d}?fill=2000&sleep=0.2" for i in range(n_files)]
                for url in urls:
                    cluster.send(url)
                cluster.wait_sql(
                    "SELECT count(*) >= 10 FROM file_checkpoints WHERE status = 'completed'",
                    timeout=60,
                    what="the batch to be under way",
                )
                filler = space / "filler"
                written = _fill(filler)
                before = cluster.status_counts()
                time.sleep(3 * lease)
                filler.unlink()
                freed_at = cluster.db_now()
                print(
                    f"\nDISK FULL ({kind}, {written >> 20} MB filler) for {3 * lease:g}s; {before}"
                )
                cluster.wait_all_terminal(n_files, timeout=120)
                last = cluster.scalar(
                    "SELECT extract(epoch FROM max(completed_at) - :t) FROM file_checkpoints",
                    t=freed_at,
                )
                refused = sum(w.log().count("No space left on device") for w in workers)
                outcomes = _outcomes(cluster)
                spent = cluster.rows(
                    "SELECT file_url, attempt FROM file_checkpoints WHERE attempt <> 1"
                )
                print(
                    f"REFUSED {refused} writes (disk full); last file completed {float(last):.1f}s"
                    f" after space came back; attempts by outcome {outcomes}; spent {spent}"
                )
                assert before.get("completed", 0) < n_files, "the disk filled too late"
                assert refused > 0, "no write of the workers was refused"
                assert cluster.status_counts() == {"completed": n_files}
                assert spent == []
                assert outcomes == {"completed": n_files}
                assert cluster.scalar("SELECT count(*) FROM sink") == n_files
                assert cluster.scalar("SELECT count(DISTINCT file_url) FROM sink") == n_files
                assert cluster.scalar("SELECT count(*) FROM sink_fill") == n_files * 2000
                cluster.wait_sql(
                    "SELECT count(*) = 1 FROM pipeline_database_trouble WHERE cause = 'disk full'",
                    timeout=10,
                    what="the disk full to be recorded",
                )
                status = run_cli("status", env=cli_env(cluster.env(task_modules=None)))
                assert "database trouble: disk full" in status.stdout, status.describe()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.timeout(180)
def test_password_fixed__files_whose_tasks_failed_on_it_run_at_once_not_after_the_waiting_rule(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, redis_url: str
) -> None:
    # The workers' password is refused: every task fails at once (its message acked), every
    # row stays pending, and nobody reaches the database. Once the password is right, the
    # first sweep after the gap hands the rows back, not the 120 s waiting rule.
    with private_cluster() as pg:
        name = f"pw_{uuid.uuid4().hex[:8]}"
        admin = f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE ROLE pw_worker LOGIN SUPERUSER PASSWORD 'not-yet'")
            conn.execute(f'CREATE DATABASE "{name}"')
        hba = pg.data / "pg_hba.conf"
        hba.write_text("host all pw_worker 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
        database_url = f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/{name}"
        worker_url = f"postgresql+psycopg://pw_worker:{SECRET}@127.0.0.1:{pg.port}/{name}"
        with _cluster_on(request, tmp_path, database_url, redis_url, lease=3.0) as cluster:
            urls = [f"file:///pw/{i:02d}" for i in range(10)]
            cluster.store.register(urls, task_name="tests.sink")
            worker = cluster.start_worker(database_url=worker_url, extra_env=FAST_SWEEP)
            for url in urls:
                cluster.send(url)
            wait_until(
                lambda: worker.log().count("StoreMisconfigured") >= len(urls),
                timeout=30,
                what="every task to fail on the password",
            )
            time.sleep(3)  # a gap of more than two sweep intervals
            assert cluster.status_counts() == {"pending": len(urls)}
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f"ALTER ROLE pw_worker PASSWORD '{SECRET}'")
            fixed = time.monotonic()
            cluster.wait_all_terminal(len(urls), timeout=60)
            took = time.monotonic() - fixed
            print(f"\nPASSWORD fixed: {len(urls)} pending files completed {took:.1f}s later")
            assert cluster.status_counts() == {"completed": len(urls)}
            assert cluster.scalar("SELECT count(*) FROM sink") == len(urls)
            assert SECRET not in worker.log()
            cluster.wait_sql(
                "SELECT count(*) = 1 FROM pipeline_database_trouble WHERE cause = 'configuration'",
                timeout=10,
                what="the configuration trouble to be recorded",
            )
