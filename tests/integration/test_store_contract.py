"""The store contract: the README's state machine, row by row, on PostgreSQL.

The state machine lives once, in the SQL; the tests of registration (register, requeue, get,
summary) also run on the in-memory store the unit tests use, so the two answer alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from pipeline import errors
from pipeline.models import Change, Claim, Outcome, Reason, Refusal, Stats, Status
from pipeline.store import Store
from pipeline.store.memory import MemoryStore
from pipeline.store.postgres import PostgresStore
from tests.support.rows import backdate_retry, expire_lease

URL = "file:///data/a.csv"
OTHER = "file:///data/b.csv"
LONG_LEASE = 600.0


@pytest.fixture(params=["memory", "postgres", "pgbouncer"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """Each store on an empty table; `pgbouncer` is PostgreSQL through a private PgBouncer in
    transaction mode (no startup options, no prepared statements: issue 21)."""
    if request.param == "memory":
        yield MemoryStore()  # type: ignore[misc]  # its registration side only
    elif request.param == "pgbouncer":
        yield request.getfixturevalue("bouncer_store")
    else:
        yield request.getfixturevalue("pg_store")


# The state machine's rows: PostgreSQL only (the SQL is the one copy of it), directly and
# through a transaction pooler.
postgres_only = pytest.mark.parametrize("store", ["postgres", "pgbouncer"], indirect=True)


def granted(result: Claim | Refusal) -> Claim:
    assert isinstance(result, Claim), result
    return result


def refused(result: Claim | Refusal, reason: Reason) -> Refusal:
    assert isinstance(result, Refusal), result
    assert result.reason is reason, result
    return result


def snapshot(store: Store, url: str = URL) -> Any:
    """The row with its history, to show that a refused write changed nothing."""
    return store.get(url, with_attempts=True)


def lose(store: Store, url: str = URL) -> tuple[Claim, Claim]:
    """A claim taken over after its lease expired: (the zombie's, the current one)."""
    old = granted(store.claim(url, "w1", LONG_LEASE))
    assert expire_lease(store, url)
    new = granted(store.claim(url, "w2", LONG_LEASE))
    return old, new


def claim_and_fail(store: Store, url: str = URL, *, retryable: bool = True) -> Claim | None:
    if isinstance(store, MemoryStore):
        if store.get(url) is None:
            store.register([url])
        store.mark(url, Status.FAILED if retryable else Status.DEAD, error="boom")
        return None
    claim = granted(store.claim(url, "w1", LONG_LEASE))
    store.fail(url, claim.token, RuntimeError("boom"), retryable=retryable)
    return claim


def make_dead(store: Store, url: str = URL) -> None:
    claim_and_fail(store, url, retryable=False)
    row = store.get(url)
    assert row is not None
    assert row.status is Status.DEAD


def make_completed(store: Store, url: str = URL, stats: Stats | None = None) -> Claim | None:
    if isinstance(store, MemoryStore):
        if store.get(url) is None:
            store.register([url])
        store.mark(url, Status.COMPLETED, stats=stats or Stats(10, 2, 8))
        return None
    claim = granted(store.claim(url, "w1", LONG_LEASE))
    store.complete(url, claim.token, stats or Stats(10, 2, 8))
    return claim


@postgres_only
def test_expire_lease__only_a_live_claim_can_expire(store: Store) -> None:
    """The test helper itself, on both stores: it must not invent leases."""
    assert expire_lease(store, URL) is False
    store.register([URL])
    assert expire_lease(store, URL) is False
    row = store.get(URL)
    assert row is not None
    assert row.lease_expires_at is None
    granted(store.claim(URL, "w1", LONG_LEASE))
    assert expire_lease(store, URL) is True
    assert granted(store.claim(URL, "w2", LONG_LEASE)).attempt == 2


# -- (none) | submit | pending ----------------------------------------------------------------


def test_submit__new_url_is_pending_and_needs_a_task(store: Store) -> None:
    (reg,) = store.register([URL], batch_id="b1", task_name="t.process", file_type="csv")
    assert (reg.file_url, reg.status, reg.needs_task, reg.task_name) == (
        URL,
        Status.PENDING,
        True,
        "t.process",
    )
    row = store.get(URL)
    assert row is not None
    assert (row.status, row.attempt, row.generation, row.token) == (Status.PENDING, 0, 1, None)
    assert (row.batch_id, row.file_type, row.task_name) == ("b1", "csv", "t.process")


@postgres_only
def test_submit__duplicates_are_registered_once_and_a_resubmission_resends_pending_rows(
    store: Store,
) -> None:
    first = store.register([URL, URL, OTHER, (URL, "etag-1")], batch_id="b1")
    assert sorted(r.file_url for r in first) == [URL, OTHER]
    assert all(r.needs_task for r in first)
    # Still pending: their message may have been lost (an interrupted submit), so a
    # resubmission enqueues them again; the row itself is left as it is.
    again = store.register([URL, OTHER], batch_id="b1")
    assert sorted((r.file_url, r.status, r.needs_task) for r in again) == [
        (URL, Status.PENDING, True),
        (OTHER, Status.PENDING, True),
    ]
    assert store.summary() == {"b1": {Status.PENDING: 2}}
    assert store.get(URL).generation == 1  # type: ignore[union-attr]


# -- (none), pending | claim | processing, attempt 1, new token, lease ------------------------


@postgres_only
def test_claim__new_url_is_granted_attempt_1_with_a_lease(store: Store) -> None:
    claim = granted(store.claim(URL, "w1", LONG_LEASE, task_name="t", task_id="id-1"))
    assert (claim.attempt, claim.generation, claim.max_attempts) == (1, 1, 3)
    assert claim.lease_seconds == LONG_LEASE
    row = store.get(URL, with_attempts=True)
    assert row is not None
    assert row.status is Status.PROCESSING
    assert row.token == claim.token
    assert (row.processed_by, row.task_name, row.task_id) == ("w1", "t", "id-1")
    assert row.lease_expires_at is not None
    assert row.started_at is not None
    assert row.lease_expires_at > row.started_at
    assert [(a.attempt, a.token, a.outcome, a.worker) for a in row.attempts] == [
        (1, claim.token, Outcome.RUNNING, "w1")
    ]


@postgres_only
def test_claim__pending_row_is_granted_attempt_1(store: Store) -> None:
    store.register([URL], batch_id="b1", task_name="t")
    claim = granted(store.claim(URL, "w1", LONG_LEASE))
    assert claim.attempt == 1
    row = store.get(URL)
    assert row is not None
    assert (row.status, row.attempt, row.token, row.batch_id) == (
        Status.PROCESSING,
        1,
        claim.token,
        "b1",
    )


# -- failed | claim | processing, attempt + 1, new token --------------------------------------


@postgres_only
def test_claim__failed_row_is_granted_the_next_attempt_with_a_new_token(store: Store) -> None:
    first = claim_and_fail(store)
    second = granted(store.claim(URL, "w2", LONG_LEASE))
    assert second.attempt == 2
    assert second.token != first.token
    row = store.get(URL, with_attempts=True)
    assert row is not None
    assert (row.status, row.attempt, row.token) == (Status.PROCESSING, 2, second.token)
    assert [a.outcome for a in row.attempts] == [Outcome.FAILED, Outcome.RUNNING]


# -- processing, lease expired, attempts left | claim or reap ---------------------------------


@postgres_only
def test_claim__expired_lease_is_taken_over(store: Store) -> None:
    old, new = lose(store)
    assert new.attempt == 2
    assert new.token != old.token
    row = store.get(URL, with_attempts=True)
    assert row is not None
    assert (row.status, row.token, row.processed_by) == (Status.PROCESSING, new.token, "w2")
    lost, running = row.attempts
    assert (lost.token, lost.outcome, lost.error_class) == (old.token, Outcome.LOST, "WorkerLost")
    assert lost.ended_at is not None
    assert "lost" in (lost.error_message or "")
    assert (running.token, running.outcome) == (new.token, Outcome.RUNNING)


@postgres_only
def test_reap__expired_lease_with_attempts_left_becomes_failed_and_is_handed_back(
    store: Store,
) -> None:
    store.register([URL], task_name="t.process")
    claim = granted(store.claim(URL, "w1", LONG_LEASE))
    granted(store.claim(OTHER, "w1", LONG_LEASE))  # a live lease: left alone
    assert expire_lease(store, URL)
    work = store.reap(waiting_seconds=3600)
    assert [(w.file_url, w.task_name, w.status) for w in work] == [
        (URL, "t.process", Status.FAILED)
    ]
    row = store.get(URL, with_attempts=True)
    assert row is not None
    assert (row.status, row.attempt, row.lease_expires_at) == (Status.FAILED, 1, None)
    assert "worker lost" in (row.error_message or "")
    assert [(a.token, a.outcome) for a in row.attempts] == [(claim.token, Outcome.LOST)]
    # The next claim is the second attempt.
    assert granted(store.claim(URL, "w2", LONG_LEASE)).attempt == 2


# -- processing, lease expired, no attempts left | claim or reap | dead ------------------------


@postgres_only
def test_claim__expired_lease_on_the_last_attempt_is_dead_worker_lost(store: Store) -> None:
    granted(store.claim(URL, "w1", LONG_LEASE, max_attempts=1))
    assert expire_lease(store, URL)
    refusal = refused(store.claim(URL, "w2", LONG_LEASE), Reason.DEAD)
    assert "worker lost" in (refusal.error or "")
    row = store.get(URL, with_attempts=True)
    assert row is not None
    assert (row.status, row.attempt, row.lease_expires_at) == (Status.DEAD, 1, None)
    assert row.error_message == refusal.error
    assert [a.outcome for a in row.attempts] == [Outcome.LOST]


@postgres_only
def test_reap__expired_lease_on_the_last_attempt_is_dead(store: Store) -> None:
    granted(store.claim(URL, "w1", LONG_LEASE, max_attempts=1, task_name="t"))
    assert expire_lease(store, URL)
    work = store.reap(waiting_seconds=3600)
    assert [(w.file_url, w.status) for w in work] == [(URL, Status.DEAD)]
    row = store.get(URL, with_attempts=True)
    assert row is not None
    assert row.status is Status.DEAD
    assert "worker lost" in (row.error_message or "")
    assert [a.outcome for a in row.attempts] == [Outcome.LOST]
    refused(store.claim(URL, "w2", LONG_LEASE), Reason.DEAD)


@postgres_only
def test_reap__live_lease_and_fresh_rows_are_left_alone(store: Store) -> None:
    store.register([OTHER])
    granted(store.claim(URL, "w1", LONG_LEASE))
    before = snapshot(store)
    assert store.reap(waiting_seconds=3600) == []
    assert snapshot(store) == before


@postgres_only
def test_reap__rows_waiting_longer_than_waiting_seconds_are_handed_back(store: Store) -> None:
    store.register([URL], task_name="t")
    claim_and_fail(store, OTHER)
    granted(store.claim("file:///data/c.csv", "w1", LONG_LEASE))
    work = store.reap(waiting_seconds=0)
    assert sorted((w.file_url, w.status) for w in work) == [
        (URL, Status.PENDING),
        (OTHER, Status.FAILED),
    ]
    # Handing a row back changes nothing else.
    row = store.get(URL)
    assert row is not None
    assert (row.status, row.attempt) == (Status.PENDING, 0)


# -- processing, lease live | claim | refused BUSY with the time left -------------------------


@postgres_only
def test_claim__live_lease_is_refused_busy_with_the_time_left(store: Store) -> None:
    claim = granted(store.claim(URL, "w1", LONG_LEASE))
    before = snapshot(store)
    refusal = refused(store.claim(URL, "w2", LONG_LEASE), Reason.BUSY)
    assert refusal.retry_in is not None
    # The time left is the holder's lease, not ours, and not more than it.
    assert LONG_LEASE / 2 < refusal.retry_in <= LONG_LEASE
    assert snapshot(store) == before
    assert store.heartbeat(URL, claim.token) is not None


@postgres_only
def test_claim__busy_time_left_is_the_holders_lease(store: Store) -> None:
    granted(store.claim(URL, "w1", 40.0))
    refusal = refused(store.claim(URL, "w2", LONG_LEASE), Reason.BUSY)
    assert refusal.retry_in is not None
    assert 0 < refusal.retry_in <= 40.0


# -- completed | claim | refused DONE with the stored stats -----------------------------------


@postgres_only
def test_claim__completed_row_is_refused_done_with_the_stored_stats(store: Store) -> None:
    make_completed(store, stats=Stats(10, 2, 8))
    before = snapshot(store)
    refusal = refused(store.claim(URL, "w2", LONG_LEASE), Reason.DONE)
    assert refusal.stats == Stats(10, 2, 8)
    assert snapshot(store) == before


# -- dead | claim | refused DEAD --------------------------------------------------------------


@postgres_only
def test_claim__dead_row_is_refused_dead_with_the_error(store: Store) -> None:
    make_dead(store)
    before = snapshot(store)
    refusal = refused(store.claim(URL, "w2", LONG_LEASE), Reason.DEAD)
    assert refusal.error == "boom"
    assert snapshot(store) == before


# -- processing | heartbeat with the current token | lease extended ---------------------------


@postgres_only
def test_heartbeat__current_token_extends_the_lease(store: Store) -> None:
    claim = granted(store.claim(URL, "w1", LONG_LEASE))
    assert expire_lease(store, URL)
    left = store.heartbeat(URL, claim.token)
    assert left is not None
    assert LONG_LEASE / 2 < left <= LONG_LEASE
    row = store.get(URL)
    assert row is not None
    assert row.lease_expires_at is not None
    assert row.lease_expires_at > row.updated_at
    # The lease is live again: nobody takes the file over.
    refused(store.claim(URL, "w2", LONG_LEASE), Reason.BUSY)
    assert store.reap(waiting_seconds=3600) == []


# -- processing | complete with the current token | completed, stats and timings stored --------


@postgres_only
def test_complete__current_token_stores_stats_and_timings(store: Store) -> None:
    claim = granted(store.claim(URL, "w1", LONG_LEASE))
    store.complete(URL, claim.token, Stats(10, 2, 8), processing_time_ms=1234)
    row = store.get(URL, with_attempts=True)
    assert row is not None
    assert row.status is Status.COMPLETED
    assert row.stats == Stats(10, 2, 8)
    assert (row.records_total, row.records_filtered, row.records_persisted) == (10, 2, 8)
    assert row.processing_time_ms == 1234
    assert row.error_message is None
    assert row.lease_expires_at is None
    assert row.completed_at is not None
    assert row.started_at is not None
    assert row.completed_at >= row.started_at
    (attempt,) = row.attempts
    assert attempt.outcome is Outcome.COMPLETED
    assert attempt.ended_at == row.completed_at


@postgres_only
def test_complete__without_a_time_measures_it_and_accepts_a_dict(store: Store) -> None:
    claim = granted(store.claim(URL, "w1", LONG_LEASE))
    store.complete(URL, claim.token, {"total": 3, "persisted": 3})
    row = store.get(URL)
    assert row is not None
    assert row.stats == Stats(3, 0, 3)
    assert row.processing_time_ms >= 0
    assert row.completed_at is not None


@postgres_only
def test_complete__bad_stats_are_refused_and_change_nothing(store: Store) -> None:
    claim = granted(store.claim(URL, "w1", LONG_LEASE))
    before = snapshot(store)
    with pytest.raises(TypeError, match="unknown stats keys"):
        store.complete(URL, claim.token, {"rows": 3})
    assert snapshot(store) == before


# -- processing | fail with the current token | failed if attempts left and retryable, else dead


@postgres_only
def test_fail__retryable_with_attempts_left_is_failed(store: Store) -> None:
    claim = granted(store.claim(URL, "w1", LONG_LEASE))
    result = store.fail(URL, claim.token, ValueError("bad row 7"))
    assert (result.status, result.attempt, result.max_attempts) == (Status.FAILED, 1, 3)
    assert result.will_retry
    row = store.get(URL, with_attempts=True)
    assert row is not None
    assert (row.status, row.error_message, row.lease_expires_at) == (
        Status.FAILED,
        "bad row 7",
        None,
    )
    (attempt,) = row.attempts
    assert (attempt.outcome, attempt.error_class, attempt.error_message) == (
        Outcome.FAILED,
        "ValueError",
        "bad row 7",
    )


@postgres_only
def test_fail__not_retryable_is_dead(store: Store) -> None:
    claim = granted(store.claim(URL, "w1", LONG_LEASE))
    result = store.fail(URL, claim.token, "corrupt header", retryable=False)
    assert (result.status, result.will_retry) == (Status.DEAD, False)
    row = store.get(URL)
    assert row is not None
    assert (row.status, row.error_message) == (Status.DEAD, "corrupt header")


@postgres_only
def test_fail__retryable_on_the_last_attempt_is_dead(store: Store) -> None:
    claim = granted(store.claim(URL, "w1", LONG_LEASE, max_attempts=1))
    result = store.fail(URL, claim.token, RuntimeError("boom"))
    assert (result.status, result.attempt, result.max_attempts) == (Status.DEAD, 1, 1)


# -- any | heartbeat / complete / fail with a stale token | nothing changes, LostClaim ---------


def _stale(store: Store, how: str) -> Claim:
    """A token that no longer holds the claim, lost in the way named by `how`."""
    if how == "taken_over":
        return lose(store)[0]
    if how == "reaped":
        claim = granted(store.claim(URL, "w1", LONG_LEASE))
        assert expire_lease(store, URL)
        assert store.reap(waiting_seconds=3600)
        return claim
    if how == "completed":
        return make_completed(store)
    if how == "failed":
        return claim_and_fail(store)
    if how == "requeued":
        claim = claim_and_fail(store, retryable=False)
        assert store.requeue(URL)
        return claim
    raise AssertionError(how)


LOST_WAYS = ["taken_over", "reaped", "completed", "failed", "requeued"]


@pytest.mark.parametrize("how", LOST_WAYS)
@postgres_only
def test_heartbeat__stale_token_changes_nothing(store: Store, how: str) -> None:
    stale = _stale(store, how)
    before = snapshot(store)
    assert store.heartbeat(URL, stale.token) is None
    assert snapshot(store) == before


@pytest.mark.parametrize("how", LOST_WAYS)
@postgres_only
def test_complete__stale_token_changes_nothing(store: Store, how: str) -> None:
    stale = _stale(store, how)
    before = snapshot(store)
    with pytest.raises(errors.LostClaim) as caught:
        store.complete(URL, stale.token, Stats(1, 1, 1))
    assert caught.value.data == {"url": URL, "token": stale.token}
    assert snapshot(store) == before


@pytest.mark.parametrize("how", LOST_WAYS)
@postgres_only
def test_fail__stale_token_changes_nothing(store: Store, how: str) -> None:
    stale = _stale(store, how)
    before = snapshot(store)
    with pytest.raises(errors.LostClaim):
        store.fail(URL, stale.token, RuntimeError("zombie"), retryable=False)
    assert snapshot(store) == before


@postgres_only
def test_complete__unknown_file_is_a_lost_claim(store: Store) -> None:
    with pytest.raises(errors.LostClaim):
        store.complete(URL, 12345)
    assert store.get(URL) is None


# -- dead, failed | requeue | pending, new generation, history kept ---------------------------


@postgres_only
def test_requeue__dead_row_is_pending_in_a_new_generation_with_history_kept(
    store: Store,
) -> None:
    store.register([URL], task_name="t.process")
    make_dead(store)
    work = store.requeue(URL)
    assert [(w.file_url, w.task_name, w.status) for w in work] == [
        (URL, "t.process", Status.PENDING)
    ]
    row = store.get(URL, with_attempts=True)
    assert row is not None
    assert (row.status, row.attempt, row.generation, row.token, row.error_message) == (
        Status.PENDING,
        0,
        2,
        None,
        None,
    )
    assert [(a.generation, a.outcome) for a in row.attempts] == [(1, Outcome.FAILED)]
    claim = granted(store.claim(URL, "w2", LONG_LEASE))
    assert (claim.attempt, claim.generation) == (1, 2)


def test_requeue__failed_row_is_pending_in_a_new_generation(store: Store) -> None:
    claim_and_fail(store)
    assert [w.status for w in store.requeue(URL)] == [Status.PENDING]
    row = store.get(URL)
    assert row is not None
    assert (row.status, row.attempt, row.generation) == (Status.PENDING, 0, 2)


@postgres_only
def test_requeue__processing_and_pending_rows_are_left_alone(store: Store) -> None:
    granted(store.claim(URL, "w1", LONG_LEASE))
    store.register([OTHER])
    before = (snapshot(store, URL), snapshot(store, OTHER))
    assert store.requeue(force=True) == []
    assert store.requeue(statuses=[Status.PROCESSING, Status.PENDING], force=True) == []
    assert (snapshot(store, URL), snapshot(store, OTHER)) == before


def test_requeue__by_batch_moves_only_that_batch(store: Store) -> None:
    store.register([URL], batch_id="b1")
    store.register([OTHER], batch_id="b2")
    make_dead(store, URL)
    make_dead(store, OTHER)
    assert [w.file_url for w in store.requeue(batch_id="b2")] == [OTHER]
    row = store.get(URL)
    assert row is not None
    assert row.status is Status.DEAD


def test_requeue__by_status_moves_only_that_status(store: Store) -> None:
    make_dead(store, URL)
    claim_and_fail(store, OTHER)
    assert [w.file_url for w in store.requeue(statuses=[Status.FAILED])] == [OTHER]
    row = store.get(URL)
    assert row is not None
    assert row.status is Status.DEAD


# -- completed | requeue --force, or submit of changed content | pending, new generation ------


@postgres_only
def test_requeue__completed_row_needs_force(store: Store) -> None:
    make_completed(store)
    before = snapshot(store)
    assert store.requeue(URL) == []
    assert store.requeue(URL, statuses=[Status.COMPLETED]) == []
    assert snapshot(store) == before


@postgres_only
def test_requeue__force_moves_completed_to_a_new_generation(store: Store) -> None:
    make_completed(store)
    assert [w.status for w in store.requeue(URL, force=True)] == [Status.PENDING]
    row = store.get(URL, with_attempts=True)
    assert row is not None
    assert (row.status, row.generation, row.attempt, row.stats, row.completed_at) == (
        Status.PENDING,
        2,
        0,
        Stats(),
        None,
    )
    assert [a.outcome for a in row.attempts] == [Outcome.COMPLETED]
    assert granted(store.claim(URL, "w2", LONG_LEASE)).generation == 2


@postgres_only
@pytest.mark.parametrize("finish", ["completed", "dead"])
def test_submit__changed_fingerprint_of_a_finished_file_starts_a_new_generation(
    store: Store, finish: str
) -> None:
    store.register([(URL, "etag-1")], batch_id="b1", task_name="t")
    if finish == "completed":
        make_completed(store)
    else:
        make_dead(store)
    (reg,) = store.register([(URL, "etag-2")], batch_id="b2", task_name="t2", max_attempts=5)
    assert (reg.status, reg.needs_task, reg.task_name) == (Status.PENDING, True, "t2")
    row = store.get(URL, with_attempts=True)
    assert row is not None
    assert (row.status, row.generation, row.attempt, row.fingerprint, row.batch_id) == (
        Status.PENDING,
        2,
        0,
        "etag-2",
        "b2",
    )
    assert row.max_attempts == 5
    assert row.stats == Stats()
    assert len(row.attempts) == 1


@postgres_only
def test_submit__same_fingerprint_of_a_completed_file_is_a_noop(store: Store) -> None:
    store.register([(URL, "etag-1")])
    make_completed(store)
    before = snapshot(store)
    (reg,) = store.register([(URL, "etag-1")])
    assert (reg.status, reg.needs_task) == (Status.COMPLETED, False)
    assert snapshot(store) == before


@pytest.mark.parametrize("state", ["pending", "processing", "failed"])
@postgres_only
def test_submit__changed_fingerprint_of_an_unfinished_file_is_left_alone(
    store: Store, state: str
) -> None:
    store.register([(URL, "etag-1")])
    if state == "processing":
        granted(store.claim(URL, "w1", LONG_LEASE))
    elif state == "failed":
        claim_and_fail(store)
    before = snapshot(store)
    (reg,) = store.register([(URL, "etag-2")])
    # Left alone; only a still-pending row is enqueued again (its message may be lost).
    assert (reg.status, reg.needs_task) == (Status(state), state == "pending")
    assert snapshot(store) == before


def test_submit__a_missing_fingerprint_never_regenerates(store: Store) -> None:
    store.register([URL])  # registered without a fingerprint
    make_completed(store)
    store.register([(OTHER, "etag-1")])
    make_completed(store, OTHER)
    assert [r.needs_task for r in store.register([(URL, "etag-2")])] == [False]
    assert [r.needs_task for r in store.register([OTHER])] == [False]
    assert {r.status for r in (store.get(URL), store.get(OTHER)) if r} == {Status.COMPLETED}


def test_register__tells_new_changed_and_unchanged_apart(store: Store) -> None:
    first = store.register([(URL, "etag-1"), (OTHER, "etag-1")])
    assert {(r.file_url, r.change) for r in first} == {(URL, Change.NEW), (OTHER, Change.NEW)}
    make_completed(store)
    make_completed(store, OTHER)
    again = store.register([(URL, "etag-2"), (OTHER, "etag-1"), ("file:///data/c.csv", "x")])
    assert sorted((r.file_url, r.change, r.needs_task) for r in again) == [
        (URL, Change.CHANGED, True),
        (OTHER, Change.UNCHANGED, False),
        ("file:///data/c.csv", Change.NEW, True),
    ]
    # A pending row registered again is unchanged, though submit still enqueues it.
    (pending,) = store.register([("file:///data/c.csv", "y")])
    assert (pending.change, pending.needs_task) == (Change.UNCHANGED, True)


def test_register__changes_only_returns_only_the_new_and_changed_rows(store: Store) -> None:
    store.register([(URL, "etag-1"), (OTHER, "etag-1")])
    make_completed(store)
    found = store.register(
        [(URL, "etag-2"), (OTHER, "etag-1"), ("file:///data/c.csv", "x")], changes_only=True
    )
    assert sorted((r.file_url, r.change) for r in found) == [
        (URL, Change.CHANGED),
        ("file:///data/c.csv", Change.NEW),
    ]
    assert store.register([(URL, "etag-2"), (OTHER, "etag-1")], changes_only=True) == []


# -- history, counters, the cap ---------------------------------------------------------------


@postgres_only
def test_history__survives_success_and_requeue(store: Store) -> None:
    first = claim_and_fail(store)
    old, second = lose(store)
    assert old.token != first.token
    store.complete(URL, second.token, Stats(1, 0, 1))
    store.requeue(URL, force=True)
    third = granted(store.claim(URL, "w3", LONG_LEASE))
    row = store.get(URL, with_attempts=True)
    assert row is not None
    assert [(a.generation, a.attempt, a.worker, a.outcome) for a in row.attempts] == [
        (1, 1, "w1", Outcome.FAILED),
        (1, 2, "w1", Outcome.LOST),
        (1, 3, "w2", Outcome.COMPLETED),
        (2, 1, "w3", Outcome.RUNNING),
    ]
    assert [a.token for a in row.attempts][-1] == third.token
    assert row.attempts[0].error_message == "boom"


@postgres_only
def test_retry_count__is_attempt_minus_one(store: Store) -> None:
    store.register([URL])
    seen = []
    for _ in range(3):
        claim = granted(store.claim(URL, "w1", LONG_LEASE))
        row = store.get(URL)
        assert row is not None
        seen.append((row.attempt, row.retry_count))
        if isinstance(store, PostgresStore):
            # The reference's column, derived in the database.
            db = store.scalar(
                "SELECT retry_count FROM file_checkpoints WHERE file_url = :u", {"u": URL}
            )
            assert db == row.retry_count
        store.fail(URL, claim.token, "again")
    assert seen == [(1, 0), (2, 1), (3, 2)]


@postgres_only
def test_max_attempts__three_executions_start_and_the_fourth_claim_is_dead(
    store: Store,
) -> None:
    """Reference defect 4: `retry_count < 3` checked before incrementing allowed four."""
    started = []
    for _ in range(5):
        result = store.claim(URL, "w1", LONG_LEASE)
        if not isinstance(result, Claim):
            break
        started.append(result.attempt)
        store.fail(URL, result.token, RuntimeError("flaky"))
    assert started == [1, 2, 3]
    refused(result, Reason.DEAD)
    row = store.get(URL)
    assert row is not None
    assert (row.status, row.attempt) == (Status.DEAD, 3)


@postgres_only
def test_max_attempts__lost_executions_count_as_attempts(store: Store) -> None:
    started = []
    for _ in range(5):
        result = store.claim(URL, "w1", LONG_LEASE)
        if not isinstance(result, Claim):
            break
        started.append(result.attempt)
        assert expire_lease(store, URL)  # the worker dies mid-task
    assert started == [1, 2, 3]
    refusal = refused(result, Reason.DEAD)
    assert "worker lost" in (refusal.error or "")
    row = store.get(URL, with_attempts=True)
    assert row is not None
    assert [a.outcome for a in row.attempts] == [Outcome.LOST] * 3


@postgres_only
def test_max_attempts__a_claim_may_set_the_cap(store: Store) -> None:
    claim = granted(store.claim(URL, "w1", LONG_LEASE, max_attempts=5))
    assert claim.max_attempts == 5
    for expected in range(2, 6):
        store.fail(URL, claim.token, "again")
        claim = granted(store.claim(URL, "w1", LONG_LEASE))
        assert (claim.attempt, claim.max_attempts) == (expected, 5)
    assert store.fail(URL, claim.token, "again").status is Status.DEAD


# -- summary ----------------------------------------------------------------------------------


@postgres_only
def test_summary__counts_per_batch(store: Store) -> None:
    store.register([f"file:///b1/{i}" for i in range(3)], batch_id="b1")
    store.register(["file:///b2/0", "file:///b2/1"], batch_id="b2")
    make_completed(store, "file:///b1/0")
    make_dead(store, "file:///b2/0")
    granted(store.claim("file:///none/0", "w1", LONG_LEASE))
    assert store.summary() == {
        "b1": {Status.COMPLETED: 1, Status.PENDING: 2},
        "b2": {Status.DEAD: 1, Status.PENDING: 1},
        None: {Status.PROCESSING: 1},
    }
    assert store.summary("b2") == {"b2": {Status.DEAD: 1, Status.PENDING: 1}}
    assert store.summary("nope") == {}


@postgres_only
def test_get__unknown_url_is_none(store: Store) -> None:
    assert store.get(URL) is None
    assert store.get(URL, with_attempts=True) is None


# -- completing inside the output transaction (G5) --------------------------------------------


@pytest.fixture
def sink(store: Store) -> str | None:
    """A table for the task's output (Postgres only), empty."""
    if not isinstance(store, PostgresStore):
        return None
    store.execute_script(
        "CREATE TABLE IF NOT EXISTS contract_sink (file_url text NOT NULL, token bigint);"
        "TRUNCATE contract_sink"
    )
    return "contract_sink"


def _write_output(tx: Any, sink: str | None, claim: Claim) -> None:
    if sink is not None:
        tx.connection.execute(
            sa.text(f"INSERT INTO {sink} (file_url, token) VALUES (:u, :t)"),
            {"u": claim.file_url, "t": claim.token},
        )


def _complete_in_a_transaction(
    store: Store, sink: str | None, claim: Claim, then: Exception | None = None
) -> None:
    """Write the output and complete in one transaction, as a task does; `then` raises after."""
    with store.transaction(token=claim.token) as tx:
        _write_output(tx, sink, claim)
        store.complete(claim.file_url, claim.token, Stats(1, 0, 1), transaction=tx)
        if then is not None:
            raise then


def _output(store: Store, sink: str | None) -> list[Any]:
    if sink is None or not isinstance(store, PostgresStore):
        return []
    return [store.scalar(f"SELECT count(*) FROM {sink}")]


@postgres_only
def test_complete__in_a_transaction_commits_with_the_output(store: Store, sink: str | None) -> None:
    claim = granted(store.claim(URL, "w1", LONG_LEASE))
    _complete_in_a_transaction(store, sink, claim)
    row = store.get(URL)
    assert row is not None
    assert row.status is Status.COMPLETED
    assert _output(store, sink) == ([1] if sink else [])


@postgres_only
def test_complete__in_a_transaction_with_a_stale_token_raises_and_rolls_back_the_output(
    store: Store, sink: str | None
) -> None:
    old, new = lose(store)
    before = snapshot(store)
    with pytest.raises(errors.LostClaim):
        _complete_in_a_transaction(store, sink, old)
    assert snapshot(store) == before
    assert _output(store, sink) == ([0] if sink else [])
    # The current holder still completes.
    store.complete(URL, new.token, Stats(2, 0, 2))
    row = store.get(URL)
    assert row is not None
    assert row.stats == Stats(2, 0, 2)


@postgres_only
def test_complete__in_a_transaction_that_fails_afterwards_is_undone(
    store: Store, sink: str | None
) -> None:
    claim = granted(store.claim(URL, "w1", LONG_LEASE))
    before = snapshot(store)
    with pytest.raises(RuntimeError, match="after complete"):
        _complete_in_a_transaction(store, sink, claim, then=RuntimeError("after complete"))
    assert snapshot(store) == before
    assert _output(store, sink) == ([0] if sink else [])
    # The claim is still held: the task can retry the completion.
    store.complete(URL, claim.token, Stats(1, 0, 1))


# -- resuming a stepped-back claim ------------------------------------------------------------


@postgres_only
def test_claim__resume_token_hands_the_claim_over_on_the_same_attempt(store: Store) -> None:
    first = granted(store.claim(URL, "w1", LONG_LEASE))
    resumed = granted(store.claim(URL, "w2", LONG_LEASE, resume_token=first.token))
    assert resumed.attempt == first.attempt
    assert resumed.token != first.token
    # A duplicate carrying the same token finds it swapped: an ordinary BUSY.
    refused(store.claim(URL, "w3", LONG_LEASE, resume_token=first.token), Reason.BUSY)
    with pytest.raises(errors.LostClaim):
        store.complete(URL, first.token)
    row = store.get(URL, with_attempts=True)
    assert row is not None
    assert [(a.attempt, a.token, a.worker) for a in row.attempts] == [(1, resumed.token, "w2")]


@postgres_only
def test_claim__a_reserved_token_is_the_granted_claims_token(store: Store) -> None:
    token = store.reserve_token()
    assert store.reserve_token() != token
    assert granted(store.claim(URL, "w1", LONG_LEASE, token=token)).token == token


@postgres_only
def test_claim__retried_after_a_lost_reply_resumes_its_own_claim_on_the_same_attempt(
    store: Store,
) -> None:
    # The first call committed, but its caller never saw the reply: all it knows is the token
    # it proposed. Its retry resumes that claim instead of waiting for the lease.
    lost_reply = store.reserve_token()
    granted(store.claim(URL, "w1", LONG_LEASE, token=lost_reply))
    retry = store.reserve_token()
    resumed = granted(
        store.claim(URL, "w1", LONG_LEASE, resume_token=[111_111_111, lost_reply], token=retry)
    )
    assert (resumed.attempt, resumed.token) == (1, retry)
    # A duplicate of the retry message carries the same tokens: an ordinary BUSY now.
    refused(store.claim(URL, "w2", LONG_LEASE, resume_token=[lost_reply]), Reason.BUSY)
    row = store.get(URL, with_attempts=True)
    assert row is not None
    assert [(a.attempt, a.token, a.outcome) for a in row.attempts] == [(1, retry, Outcome.RUNNING)]


@postgres_only
def test_claim__resume_tokens_of_another_claim_change_nothing(store: Store) -> None:
    first = granted(store.claim(URL, "w1", LONG_LEASE))
    refused(store.claim(URL, "w2", LONG_LEASE, resume_token=[first.token + 1]), Reason.BUSY)
    row = store.get(URL)
    assert row is not None
    assert row.token == first.token


# -- abandon: the claim of a process known to be dead -----------------------------------------


@postgres_only
def test_abandon__dead_process_claim_moves_on_as_if_its_lease_expired(store: Store) -> None:
    claim = granted(store.claim(URL, "node:41", LONG_LEASE, task_id="t-1", task_name="t"))
    assert store.abandon(URL, "node:41", "t-1") is Status.FAILED
    row = store.get(URL, with_attempts=True)
    assert row is not None
    assert (row.status, row.lease_expires_at) == (Status.FAILED, None)
    assert "node:41" in (row.error_message or "")
    assert [(a.token, a.outcome, a.error_class) for a in row.attempts] == [
        (claim.token, Outcome.LOST, "WorkerLost")
    ]
    with pytest.raises(errors.LostClaim):
        store.complete(URL, claim.token)
    assert granted(store.claim(URL, "node:42", LONG_LEASE)).attempt == 2


@postgres_only
def test_abandon__on_the_last_attempt_is_dead(store: Store) -> None:
    granted(store.claim(URL, "node:41", LONG_LEASE, max_attempts=1, task_id="t-1"))
    assert store.abandon(URL, "node:41", "t-1") is Status.DEAD
    refusal = refused(store.claim(URL, "node:42", LONG_LEASE), Reason.DEAD)
    assert "worker lost" in (refusal.error or "")


@pytest.mark.parametrize(("worker", "task_id"), [("node:99", "t-1"), ("node:41", "t-2")])
@postgres_only
def test_abandon__another_process_or_task_changes_nothing(
    store: Store, worker: str, task_id: str
) -> None:
    granted(store.claim(URL, "node:41", LONG_LEASE, task_id="t-1"))
    before = snapshot(store)
    assert store.abandon(URL, worker, task_id) is None
    assert snapshot(store) == before
    assert store.abandon(OTHER, "node:41", "t-1") is None


# -- what `pipeline status` and the metrics read ----------------------------------------------


@postgres_only
def test_overview__counts_leases_dead_files_and_records(store: Store) -> None:
    store.register([URL, OTHER, "file:///data/c.csv", "file:///data/d.csv"], batch_id="b1")
    make_completed(store, URL, Stats(10, 2, 8))
    make_dead(store, OTHER)
    granted(store.claim("file:///data/c.csv", "w1", LONG_LEASE))
    granted(store.claim("file:///data/d.csv", "w1", LONG_LEASE))
    assert expire_lease(store, "file:///data/d.csv")
    view = store.overview("b1")
    assert view.counts == {
        "b1": {Status.COMPLETED: 1, Status.DEAD: 1, Status.PROCESSING: 2},
    }
    assert view.completed_last_minute == 1
    assert view.expired_leases == 1
    assert view.oldest_live_lease_age is not None
    assert view.oldest_live_lease_age >= 0
    assert [(d.file_url, d.error, d.attempts) for d in view.dead] == [(OTHER, "boom", 1)]
    assert view.records == Stats(10, 2, 8)
    assert store.overview(dead_limit=0).dead == ()
    assert store.overview().records is None


@postgres_only
def test_operations__counts_attempts_ended_in_the_window_by_outcome_and_class(
    store: Store,
) -> None:
    make_completed(store, URL)
    claim_and_fail(store, OTHER)
    lose(store, "file:///data/c.csv")
    ops = store.operations(window_seconds=900)
    assert ops.window_attempts == {
        ("completed", ""): 1,
        ("failed", "RuntimeError"): 1,
        ("lost", "WorkerLost"): 1,
    }
    assert ops.counts[Status.PROCESSING] == 1  # the lost one's second claim, still running
    assert ops.window_run_seconds["completed"].count == 1


@postgres_only
def test_record_trace__kept_on_the_attempt_through_its_end_and_never_for_a_stale_token(
    store: Store,
) -> None:
    claim = store.claim(URL, "w1", 30)
    assert isinstance(claim, Claim)
    store.record_trace(URL, claim.token, "ab" * 16)
    store.record_trace(URL, claim.token + 1000, "cd" * 16)  # not the current claim: nothing
    assert [(a.outcome, a.trace_id) for a in snapshot(store).attempts] == [
        (Outcome.RUNNING, "ab" * 16)
    ]
    store.complete(URL, claim.token, {"total": 1})
    assert [(a.outcome, a.trace_id) for a in snapshot(store).attempts] == [
        (Outcome.COMPLETED, "ab" * 16)
    ]


# -- backoff on the database clock (the README's "Postgres decides") -------------------------


@postgres_only
def test_fail__with_retry_in_refuses_a_claim_before_it_is_due(store: Store) -> None:
    claim = granted(store.claim(URL, "w1", LONG_LEASE))
    outcome = store.fail(URL, claim.token, RuntimeError("boom"), retry_in=600)
    assert outcome.status is Status.FAILED
    assert outcome.retry_in is not None
    assert 590 < outcome.retry_in <= 600
    before = snapshot(store)
    refusal = refused(store.claim(URL, "w2", LONG_LEASE), Reason.NOT_DUE)
    assert refusal.retry_in is not None
    assert 590 < refusal.retry_in <= 600
    assert refusal.error == "boom"
    # An early delivery changes nothing: no attempt spent, no history written.
    assert snapshot(store) == before
    row = store.get(URL)
    assert row is not None
    assert row.retry_at is not None


@postgres_only
def test_fail__once_due_the_next_claim_is_the_next_attempt(store: Store) -> None:
    claim = granted(store.claim(URL, "w1", LONG_LEASE))
    store.fail(URL, claim.token, RuntimeError("boom"), retry_in=600)
    assert backdate_retry(store, URL, 0.01)
    again = granted(store.claim(URL, "w2", LONG_LEASE))
    assert again.attempt == 2
    row = store.get(URL)
    assert row is not None
    assert row.retry_at is None


@postgres_only
def test_fail__the_last_attempt_is_dead_without_a_retry_time(store: Store) -> None:
    claim = granted(store.claim(URL, "w1", LONG_LEASE, max_attempts=1))
    outcome = store.fail(URL, claim.token, RuntimeError("boom"), retry_in=600)
    assert (outcome.status, outcome.retry_in) == (Status.DEAD, None)
    refused(store.claim(URL, "w2", LONG_LEASE), Reason.DEAD)


@postgres_only
def test_reap__an_overdue_retry_is_handed_back_once_then_waits_like_a_pending_row(
    store: Store,
) -> None:
    store.register([URL], task_name="t.process")
    claim = granted(store.claim(URL, "w1", LONG_LEASE))
    store.fail(URL, claim.token, RuntimeError("boom"), retry_in=600)
    # Not due yet, and due but not overdue: the retry message is still expected.
    assert store.reap(waiting_seconds=None, overdue_seconds=5) == []
    assert backdate_retry(store, URL, 1)
    assert store.reap(waiting_seconds=None, overdue_seconds=5) == []
    # Overdue (its message lost): handed back, even while the queue has messages.
    assert backdate_retry(store, URL, 10)
    work = store.reap(waiting_seconds=None, overdue_seconds=5)
    assert [(w.file_url, w.task_name, w.status) for w in work] == [
        (URL, "t.process", Status.FAILED)
    ]
    # Once only: from now on it waits for the queue to drain like a pending row.
    assert store.reap(waiting_seconds=None, overdue_seconds=5) == []
    assert granted(store.claim(URL, "w2", LONG_LEASE)).attempt == 2


@postgres_only
def test_reap__a_retry_not_yet_due_is_not_handed_back_as_waiting(store: Store) -> None:
    claim = granted(store.claim(URL, "w1", LONG_LEASE))
    store.fail(URL, claim.token, RuntimeError("boom"), retry_in=600)
    assert store.reap(waiting_seconds=0) == []


@postgres_only
def test_requeue__clears_the_retry_time(store: Store) -> None:
    claim = granted(store.claim(URL, "w1", LONG_LEASE))
    store.fail(URL, claim.token, RuntimeError("boom"), retry_in=600)
    assert [w.file_url for w in store.requeue(statuses=[Status.FAILED])] == [URL]
    assert granted(store.claim(URL, "w2", LONG_LEASE)).attempt == 1
