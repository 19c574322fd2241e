"""The store contract for resuming inside a file, on PostgreSQL: chunk commits are fenced and
carry the position to the next attempt; progress spends no attempt; a new generation starts
from the beginning."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from pipeline import errors
from pipeline.models import Claim, Outcome, Refusal, Stats, Status
from pipeline.store.postgres import PostgresStore
from tests.support.rows import expire_lease

URL = "file:///data/big.jsonl"
LEASE = 600.0


def granted(result: Claim | Refusal) -> Claim:
    assert isinstance(result, Claim), result
    return result


def chunk(
    store: PostgresStore, claim: Claim, line: int, *, version: str = "v1", rows: int = 0
) -> None:
    """One chunk committed in its own output transaction: `rows` sink rows and the position."""
    with store.transaction(token=claim.token) as out:
        for n in range(rows):
            out.execute(
                sa.text("INSERT INTO chunk_sink (file_url, line) VALUES (:u, :n)"),
                {"u": claim.file_url, "n": line - rows + n + 1},
            )
        store.commit_chunk(
            claim.file_url,
            claim.token,
            {"offset": line * 10, "line": line},
            version=version,
            stats=Stats(line, 0, line),
            progress_bytes=line * 10,
            size_bytes=1000,
            transaction=out,
        )


@pytest.fixture
def store(pg_store: PostgresStore) -> PostgresStore:
    pg_store.execute_script(
        "CREATE TABLE IF NOT EXISTS chunk_sink (file_url text, line int); TRUNCATE chunk_sink"
    )
    return pg_store


def sink_lines(store: PostgresStore) -> int:
    return int(store.scalar("SELECT count(*) FROM chunk_sink"))


def test_chunk__commits_its_position_stats_and_version_and_extends_the_lease(
    store: PostgresStore,
) -> None:
    claim = granted(store.claim(URL, "w1", 5.0))
    store.scalar(
        "UPDATE file_checkpoints SET lease_expires_at = now() + interval '1 second'"
        " WHERE file_url = :u RETURNING 1",
        {"u": URL},
    )
    chunk(store, claim, 40, rows=40)
    row = store.get(URL)
    assert row is not None
    assert (row.position, row.position_version) == ({"offset": 400, "line": 40}, "v1")
    assert (row.stats, row.progress_bytes, row.size_bytes) == (Stats(40, 0, 40), 400, 1000)
    assert row.lease_expires_at is not None
    assert row.progress_at is not None
    assert (row.lease_expires_at - row.progress_at).total_seconds() == pytest.approx(5, abs=0.5)
    assert sink_lines(store) == 40


def test_chunk__the_next_attempt_is_handed_the_position_version_and_stats(
    store: PostgresStore,
) -> None:
    first = granted(store.claim(URL, "w1", LEASE))
    chunk(store, first, 10)
    chunk(store, first, 20)
    assert expire_lease(store, URL)
    second = granted(store.claim(URL, "w2", LEASE))
    assert (second.attempt, second.generation) == (2, 1)
    assert (second.position, second.version, second.stats) == (
        {"offset": 200, "line": 20},
        "v1",
        Stats(20, 0, 20),
    )


def test_chunk__with_a_stale_token_raises_and_rolls_back_its_output(store: PostgresStore) -> None:
    zombie = granted(store.claim(URL, "w1", LEASE))
    chunk(store, zombie, 10, rows=10)
    assert expire_lease(store, URL)
    current = granted(store.claim(URL, "w2", LEASE))
    with pytest.raises(errors.LostClaim):
        chunk(store, zombie, 20, rows=10)
    assert sink_lines(store) == 10  # the zombie's second chunk left nothing
    row = store.get(URL)
    assert row is not None
    assert (row.token, row.position) == (current.token, {"offset": 100, "line": 10})


def test_progress__a_lost_attempt_that_committed_a_chunk_spends_no_attempt(
    store: PostgresStore,
) -> None:
    # Lost five times on a cap of 2, each time after a chunk that moved on: still claimable.
    for n in range(1, 6):
        claim = granted(store.claim(URL, f"w{n}", LEASE, max_attempts=2))
        assert claim.attempt == n
        chunk(store, claim, 10 * n)
        assert expire_lease(store, URL)
    row = store.get(URL)
    assert row is not None
    assert row.attempts_spent == 0
    last = granted(store.claim(URL, "w9", LEASE, max_attempts=2))
    assert last.position == {"offset": 500, "line": 50}


def test_progress__attempts_without_progress_are_dead_at_the_cap(store: PostgresStore) -> None:
    first = granted(store.claim(URL, "w1", LEASE, max_attempts=2))
    chunk(store, first, 10)
    assert expire_lease(store, URL)  # progress: spends nothing
    granted(store.claim(URL, "w2", LEASE, max_attempts=2))
    assert expire_lease(store, URL)  # none: 1 of 2
    granted(store.claim(URL, "w3", LEASE, max_attempts=2))
    assert expire_lease(store, URL)  # none: 2 of 2
    refused = store.claim(URL, "w4", LEASE, max_attempts=2)
    assert isinstance(refused, Refusal)
    row = store.get(URL)
    assert row is not None
    assert (row.status, row.attempt, row.attempts_spent) == (Status.DEAD, 3, 2)


def test_progress__a_chunk_that_does_not_move_the_position_is_not_progress(
    store: PostgresStore,
) -> None:
    first = granted(store.claim(URL, "w1", LEASE, max_attempts=1))
    chunk(store, first, 10)
    assert expire_lease(store, URL)
    second = granted(store.claim(URL, "w2", LEASE, max_attempts=1))
    chunk(store, second, 10)  # the same position again
    assert expire_lease(store, URL)
    assert isinstance(store.claim(URL, "w3", LEASE, max_attempts=1), Refusal)


def test_progress__a_failure_after_a_chunk_spends_nothing_a_permanent_one_is_dead(
    store: PostgresStore,
) -> None:
    claim = granted(store.claim(URL, "w1", LEASE, max_attempts=1))
    chunk(store, claim, 10)
    result = store.fail(URL, claim.token, RuntimeError("blip"), retryable=True)
    assert (result.status, result.will_retry) == (Status.FAILED, True)
    claim = granted(store.claim(URL, "w1", LEASE, max_attempts=1))
    chunk(store, claim, 20)
    result = store.fail(URL, claim.token, RuntimeError("bad"), retryable=False)
    assert result.status is Status.DEAD


def test_progress__abandon_and_the_sweep_after_a_chunk_leave_the_file_failed(
    store: PostgresStore,
) -> None:
    claim = granted(store.claim(URL, "w1", LEASE, max_attempts=1, task_id="t1"))
    chunk(store, claim, 10)
    assert store.abandon(URL, "w1", "t1") is Status.FAILED
    claim = granted(store.claim(URL, "w2", LEASE, max_attempts=1))
    chunk(store, claim, 20)
    assert expire_lease(store, URL)
    (work,) = store.reap(waiting_seconds=None)
    assert (work.file_url, work.status) == (URL, Status.FAILED)
    assert granted(store.claim(URL, "w3", LEASE, max_attempts=1)).position["line"] == 20


def test_history__each_attempt_keeps_where_it_started_and_ended(store: PostgresStore) -> None:
    first = granted(store.claim(URL, "w1", LEASE))
    chunk(store, first, 10)
    chunk(store, first, 20)
    assert expire_lease(store, URL)
    second = granted(store.claim(URL, "w2", LEASE))
    chunk(store, second, 30)
    store.complete(URL, second.token, Stats(30, 0, 30))
    row = store.get(URL, with_attempts=True)
    assert row is not None
    assert [(a.outcome, a.start_position, a.end_position, a.chunks) for a in row.attempts] == [
        (Outcome.LOST, None, {"offset": 200, "line": 20}, 2),
        (Outcome.COMPLETED, {"offset": 200, "line": 20}, {"offset": 300, "line": 30}, 1),
    ]


@pytest.mark.parametrize("how", ["changed content", "requeue --force"])
def test_new_generation__starts_at_the_beginning(store: PostgresStore, how: str) -> None:
    store.register([(URL, "etag-1")])
    claim = granted(store.claim(URL, "w1", LEASE, max_attempts=1))
    chunk(store, claim, 10)
    store.complete(URL, claim.token, Stats(10, 0, 10))
    if how == "changed content":
        store.register([(URL, "etag-2")])
    else:
        store.requeue(URL, force=True)
    again = granted(store.claim(URL, "w2", LEASE, max_attempts=1))
    assert (again.generation, again.attempt) == (2, 1)
    assert (again.position, again.version, again.stats) == (None, None, Stats())


def test_restart__the_object_changed_a_new_generation_under_the_same_claim(
    store: PostgresStore,
) -> None:
    store.register([(URL, "etag-1")])
    first = granted(store.claim(URL, "w1", LEASE, max_attempts=2))
    chunk(store, first, 10, version="etag-1")
    assert expire_lease(store, URL)
    second = granted(store.claim(URL, "w2", LEASE, max_attempts=2))
    assert store.restart(URL, second.token, "etag-2", "etag-2") == 2
    row = store.get(URL)
    assert row is not None
    assert (row.generation, row.attempt, row.attempts_spent) == (2, 1, 0)
    assert (row.position, row.position_version, row.fingerprint) == (None, "etag-2", "etag-2")
    chunk(store, second, 5, version="etag-2")  # the claim is still good
    store.complete(URL, second.token, Stats(5, 0, 5))
    with pytest.raises(errors.LostClaim):
        store.restart(URL, first.token, "etag-3")


def test_overview__a_running_file_shows_its_committed_progress(store: PostgresStore) -> None:
    store.register([URL], batch_id="big")
    claim = granted(store.claim(URL, "w1", LEASE))
    chunk(store, claim, 40)
    overview = store.overview("big")
    (running,) = overview.running
    assert (running.file_url, running.attempt, running.records) == (URL, 1, 40)
    assert (running.progress_bytes, running.size_bytes, running.percent) == (400, 1000, 40.0)
    assert running.seconds >= 0
    assert overview.records_in_flight == 40
    store.complete(URL, claim.token, Stats(100, 0, 100))
    assert store.overview("big").running == ()
