"""Database trouble is never the file's fault (issue 25): a configuration the database
refuses fails at once, visibly; an outage of any length spends no attempt.

Real `pipeline` CLI runs, real `celery worker` subprocesses, private PostgreSQL clusters
stopped, filled or out of connections.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from tests.support.cli_helpers import assert_no_traceback, cli_env, run_cli
from tests.support.fakepg import RefusingServer
from tests.support.workers import Cluster, wait_until

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
