"""Behind PgBouncer (issue 21): real workers and `pipeline submit --wait` through a private
PgBouncer 1.18 (Debian's) in transaction mode and in session mode, with the plain
configuration of tests/support/pgbouncer.py.

Before issue 21 every connection failed there with "unsupported startup parameter: options".
The workers and the CLI are told what is in between (PIPELINE_DATABASE_POOLER) and where the
database is directly (PIPELINE_DATABASE_DIRECT_URL, for what needs a session).
"""

from __future__ import annotations

import pathlib
import uuid
from collections.abc import Iterator

import pytest

from pipeline.reference import sample
from tests.support import pgbouncer
from tests.support.cli_helpers import assert_no_traceback, cli_env, run_cli
from tests.support.workers import Cluster

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
