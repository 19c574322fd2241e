"""`pipeline prune` on PostgreSQL (issue 21, item 4): the attempt history past a retention
goes, each file's latest attempts stay; completed files stay (a resubmission is a no-op)
unless the operator forgets them, after which a resubmission runs the file again."""

from __future__ import annotations

import pytest

from pipeline.models import Change, Claim, Stats, Status
from pipeline.store.postgres import PostgresStore
from pipeline.worker import sweep
from tests.support.cli_helpers import cli_env, run_cli

DAY = 86400.0
OLD = "file:///prune/old-completed.csv"  # 3 attempts, all 40 days ago, completed
RUNNING = "file:///prune/running.csv"  # failed 40 days ago, running now
RECENT = "file:///prune/recent.csv"  # failed an hour ago


def _claim(store: PostgresStore, url: str) -> Claim:
    result = store.claim(url, "w1", 600)
    assert isinstance(result, Claim), result
    return result


def _history(store: PostgresStore) -> None:
    for _ in range(2):
        store.fail(OLD, _claim(store, OLD).token, RuntimeError("boom"), retry_in=0)
    store.complete(OLD, _claim(store, OLD).token, Stats(1, 0, 1))
    store.fail(RUNNING, _claim(store, RUNNING).token, RuntimeError("boom"), retry_in=0)
    _claim(store, RUNNING)
    store.fail(RECENT, _claim(store, RECENT).token, RuntimeError("boom"), retry_in=0)
    store.execute_script(
        "UPDATE file_attempts SET ended_at = ended_at - interval '40 days',"
        "  started_at = started_at - interval '40 days'"
        f" WHERE file_url IN ('{OLD}', '{RUNNING}');"
        "UPDATE file_attempts SET ended_at = ended_at - interval '1 hour'"
        f" WHERE file_url = '{RECENT}';"
        "UPDATE file_checkpoints SET completed_at = completed_at - interval '40 days'"
        f" WHERE file_url = '{OLD}'"
    )


def _attempts(store: PostgresStore, url: str) -> list[tuple[int, str]]:
    row = store.get(url, with_attempts=True)
    assert row is not None
    return [(a.attempt, a.outcome.value) for a in row.attempts]


def test_prune__old_history_goes_but_each_files_latest_attempt_and_completed_rows_stay(
    pg_store: PostgresStore,
) -> None:
    _history(pg_store)
    assert _attempts(pg_store, OLD) == [(1, "failed"), (2, "failed"), (3, "completed")]

    pruned = pg_store.prune(30 * DAY, keep=1, batch=1)  # batch 1: the loop goes round
    assert (pruned.attempts, pruned.files) == (2, 0)
    assert _attempts(pg_store, OLD) == [(3, "completed")]
    # The running attempt is not history; the one before it is that file's latest ended one.
    assert _attempts(pg_store, RUNNING) == [(1, "failed"), (2, "running")]
    assert _attempts(pg_store, RECENT) == [(1, "failed")]
    assert pg_store.prune(30 * DAY, keep=1).attempts == 0  # nothing left to prune

    # The completed row stays: a resubmission of it is still a no-op.
    (again,) = pg_store.register([OLD])
    assert (again.status, again.change, again.needs_task) == (
        Status.COMPLETED,
        Change.UNCHANGED,
        False,
    )


def test_prune__keep_two_keeps_the_two_latest(pg_store: PostgresStore) -> None:
    _history(pg_store)
    assert pg_store.prune(30 * DAY, keep=2).attempts == 1
    assert _attempts(pg_store, OLD) == [(2, "failed"), (3, "completed")]


def test_prune__forgotten_completed_file_runs_again_when_resubmitted(
    pg_store: PostgresStore,
) -> None:
    _history(pg_store)
    pruned = pg_store.prune(30 * DAY, forget_completed_older_than=30 * DAY)
    assert pruned.files == 1
    assert pg_store.get(OLD) is None  # forgotten, its history with it
    count = "SELECT count(*) FROM file_attempts WHERE file_url = :u"
    assert pg_store.scalar(count, {"u": OLD}) == 0
    assert pg_store.get(RUNNING) is not None  # only completed files are forgotten
    (again,) = pg_store.register([OLD])
    assert (again.status, again.change, again.needs_task) == (Status.PENDING, Change.NEW, True)
    assert _claim(pg_store, OLD).attempt == 1


def test_pipeline_prune__the_command_prunes_and_says_so(
    pg_store: PostgresStore, database_url: str
) -> None:
    _history(pg_store)
    env = cli_env(PIPELINE_DATABASE_URL=database_url)
    result = run_cli("prune", "--attempts-older-than", "30d", env=env)
    assert result.returncode == 0, result.describe()
    assert "pruned 2 attempts" in result.output, result.describe()
    assert pg_store.get(OLD) is not None

    bad = run_cli("prune", "--attempts-older-than", "a while", env=env)
    assert bad.returncode == 2, bad.describe()
    assert "is not an age" in bad.output + bad.flat_stderr

    result = run_cli("prune", "--forget-completed-older-than", "4w", env=env)
    assert result.returncode == 0, result.describe()
    assert "pruned 0 attempts; forgot 1 completed files" in result.output, result.describe()
    assert pg_store.get(OLD) is None


def _old_attempts(store: PostgresStore) -> int:
    return int(
        store.scalar("SELECT count(*) FROM file_attempts WHERE ended_at < now() - interval '1 day'")
    )


def test_sweep_prune__with_the_setting_one_worker_of_the_fleet_prunes_per_interval(
    pg_store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _history(pg_store)
    monkeypatch.setenv("PIPELINE_PRUNE_AFTER", "30d")
    monkeypatch.setenv("PIPELINE_PRUNE_INTERVAL", "1h")
    one, other = sweep.Pruner.from_settings(), sweep.Pruner.from_settings()
    assert (one.after, one.interval) == (30 * DAY, 3600.0)

    pruned = one.round(pg_store)
    assert pruned is not None
    assert pruned.attempts == 2
    assert _attempts(pg_store, OLD) == [(3, "completed")]
    assert _attempts(pg_store, RECENT) == [(1, "failed")]
    # Another worker's sweep in the same interval: not its turn, nothing deleted.
    pg_store.execute_script(
        f"UPDATE file_attempts SET ended_at = ended_at - interval '40 days'"
        f" WHERE file_url = '{RECENT}'"
    )
    pg_store.fail(RECENT, _claim(pg_store, RECENT).token, RuntimeError("boom"), retry_in=0)
    assert other.round(pg_store) is None
    assert one.round(pg_store) is None
    assert _attempts(pg_store, RECENT) == [(1, "failed"), (2, "failed")]
    # An interval later, whichever sweep asks first takes the turn.
    pg_store.execute_script("UPDATE pipeline_chores SET started_at = started_at - interval '61m'")
    again = other.round(pg_store)
    assert again is not None
    assert again.attempts == 1
    assert _attempts(pg_store, RECENT) == [(2, "failed")]
    assert one.round(pg_store) is None


def test_sweep_prune__without_the_setting_nothing_is_pruned(
    pg_store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _history(pg_store)
    monkeypatch.delenv("PIPELINE_PRUNE_AFTER", raising=False)
    pruner = sweep.Pruner.from_settings()
    assert pruner.after is None
    assert pruner.round(pg_store) is None
    assert _old_attempts(pg_store) == 4  # OLD's three, RUNNING's ended one
    assert pg_store.scalar("SELECT count(*) FROM pipeline_chores") == 0  # no turn taken


def test_sweep_prune__a_big_history_is_spread_over_the_rounds_of_one_turn(
    pg_store: PostgresStore,
) -> None:
    _history(pg_store)
    pruner = sweep.Pruner(30 * DAY, 3600.0, batches_per_round=1, batch=1)
    deleted = []
    while (pruned := pruner.round(pg_store)) is not None and len(deleted) < 10:
        deleted.append((pruned.attempts, pruned.more))
    # One row a round while a batch comes back full; the round that finds less ends the turn,
    # and the next round finds it not due.
    assert deleted == [(1, True), (1, True), (0, False)]
    assert _old_attempts(pg_store) == 2  # each file's latest ended attempt is kept
    assert pg_store.scalar("SELECT count(*) FROM pipeline_chores") == 1
