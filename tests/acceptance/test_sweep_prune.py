"""The sweep of a real worker prunes attempt history when PIPELINE_PRUNE_AFTER is set, and
leaves it alone when it is not (issue 21, item 4; the README's "Running a fleet")."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from pipeline.models import Claim
from tests.support.workers import Cluster, wait_until

pytestmark = pytest.mark.slow

FAILED_LONG_AGO = "file:///sweep-prune/old.csv"  # 3 ended attempts, 40 days ago


def _old_history(cluster: Cluster) -> None:
    for n in range(3):
        claim = cluster.store.claim(FAILED_LONG_AGO, "w0", 600, max_attempts=10)
        assert isinstance(claim, Claim), claim
        # The last retry an hour away: the sweep leaves the file alone meanwhile.
        retry_in = 3600 if n == 2 else 0
        cluster.store.fail(FAILED_LONG_AGO, claim.token, RuntimeError("boom"), retry_in=retry_in)
    with cluster.engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE file_attempts SET ended_at = ended_at - interval '40 days',"
            " started_at = started_at - interval '40 days'"
        )


def _attempts(cluster: Cluster) -> int:
    return int(cluster.scalar("SELECT count(*) FROM file_attempts"))


def _sweeps(cluster: Cluster) -> float:
    """How long the worker's sweep thread has been going round (its heartbeats)."""
    return float(
        cluster.scalar(
            "SELECT coalesce(max(extract(epoch FROM seen_at - started_at)), 0)"
            " FROM pipeline_workers"
        )
    )


@pytest.mark.parametrize("prune_after", ["30d", None])
def test_sweep__prunes_old_attempts_with_the_setting_and_not_without(
    make_cluster: Callable[..., Cluster], prune_after: str | None
) -> None:
    cluster = make_cluster()
    _old_history(cluster)
    assert _attempts(cluster) == 3
    env = {"PIPELINE_REAP_INTERVAL": "0.5"}
    if prune_after is not None:
        env["PIPELINE_PRUNE_AFTER"] = prune_after
    cluster.start_worker(concurrency=1, extra_env=env)
    if prune_after is not None:
        wait_until(
            lambda: _attempts(cluster) == 1,
            timeout=30,
            what="the sweep to prune the old attempts (the latest one kept)",
            describe=lambda: f"{_attempts(cluster)} attempts",
        )
        assert cluster.scalar("SELECT count(*) FROM pipeline_chores WHERE name = 'prune'") == 1
    else:
        # Several rounds of the sweep (the first is a heartbeat only), and nothing pruned.
        wait_until(lambda: _sweeps(cluster) >= 3.0, timeout=30, what="a few sweeps")
        time.sleep(0.5)
        assert _attempts(cluster) == 3
        assert cluster.scalar("SELECT count(*) FROM pipeline_chores") == 0
