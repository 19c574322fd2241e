"""Random interleavings of three workers on three files, checked against a model of the
state machine.

The model below is plain Python written from the README's state machine table: the machine
drives PostgreSQL and compares every answer and every row with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from pipeline import errors
from pipeline.models import Claim, Outcome, Reason, Refusal, Stats, Status
from pipeline.store import Store
from pipeline.store.postgres import PostgresStore
from tests.support.rows import expire_lease

URLS = ("file:///s/0", "file:///s/1", "file:///s/2")
# Each file has its own cap, passed on every claim and register, so caps are never lowered.
CAPS = {URLS[0]: 2, URLS[1]: 3, URLS[2]: 3}
WORKERS = ("w0", "w1", "w2")
# Leases end only when the machine says so (expire_lease), never by the wall clock.
LEASE = 600.0
PG_SETTINGS = settings(max_examples=50, stateful_step_count=40, deadline=None)


@dataclasses.dataclass
class Row:
    """The model of one checkpoint row."""

    status: Status
    max_attempts: int
    attempt: int = 0
    generation: int = 1
    token: int | None = None
    lease_live: bool = False
    stats: Stats = dataclasses.field(default_factory=Stats)
    error: str | None = None
    # The error is one of the store's own "worker lost ..." texts, not the caller's.
    error_is_lost: bool = False
    fingerprint: str | None = None
    # (generation, attempt, token, outcome) of every execution, oldest first
    history: list[list[Any]] = dataclasses.field(default_factory=list)

    def end_attempt(self, outcome: Outcome) -> None:
        for entry in self.history:
            if entry[2] == self.token and entry[3] is Outcome.RUNNING:
                entry[3] = outcome

    def new_generation(self) -> None:
        self.status = Status.PENDING
        self.attempt = 0
        self.generation += 1
        self.token = None
        self.lease_live = False
        self.stats = Stats()
        self.error = None
        self.error_is_lost = False


@dataclasses.dataclass(frozen=True)
class Held:
    """A claim some worker was granted once (it may have been lost since)."""

    worker: str
    url: str
    token: int


class StoreMachine(RuleBasedStateMachine):
    """Claim / heartbeat / complete / fail / expire / reap / requeue / register, at random."""

    claims = Bundle("claims")

    def make_store(self) -> Store:
        raise NotImplementedError

    def __init__(self) -> None:
        super().__init__()
        self.store = self.make_store()
        self.model: dict[str, Row] = {}
        self.tokens_seen: set[int] = set()
        self.held: list[Held] = []
        self.errors = 0

    # -- helpers ----------------------------------------------------------------------------

    def snapshot(self, url: str) -> Any:
        return self.store.get(url, with_attempts=True)

    def is_current(self, held: Held) -> bool:
        row = self.model.get(held.url)
        return row is not None and row.status is Status.PROCESSING and row.token == held.token

    def next_error(self) -> str:
        self.errors += 1
        return f"error {self.errors}"

    # -- rules ------------------------------------------------------------------------------

    @rule(target=claims, worker=st.sampled_from(WORKERS), url=st.sampled_from(URLS))
    def claim(self, worker: str, url: str) -> Any:
        cap = CAPS[url]
        result = self.store.claim(url, worker, LEASE, max_attempts=cap)
        row = self.model.get(url)
        if row is None:
            row = self.model[url] = Row(Status.PROCESSING, max_attempts=cap)
            return self._granted(result, worker, url, row)
        if row.status is Status.COMPLETED:
            assert isinstance(result, Refusal), result
            assert (result.reason, result.stats) == (Reason.DONE, row.stats)
            return multiple()
        if row.status is Status.DEAD:
            assert isinstance(result, Refusal), result
            assert result.reason is Reason.DEAD
            self._check_error(result.error, row)
            return multiple()
        if row.status is Status.PROCESSING and row.lease_live:
            assert isinstance(result, Refusal), result
            assert result.reason is Reason.BUSY
            assert result.retry_in is not None
            assert 0 < result.retry_in <= LEASE
            return multiple()
        was_processing = row.status is Status.PROCESSING
        if was_processing:
            # the lease ran out: that execution is lost and counts
            row.end_attempt(Outcome.LOST)
        row.max_attempts = cap
        if row.attempt >= cap:
            row.status = Status.DEAD
            row.lease_live = False
            if was_processing:
                row.error, row.error_is_lost = None, True
            assert isinstance(result, Refusal), result
            assert result.reason is Reason.DEAD
            self._check_error(result.error, row)
            return multiple()
        row.status = Status.PROCESSING
        return self._granted(result, worker, url, row)

    def _granted(self, result: Claim | Refusal, worker: str, url: str, row: Row) -> Any:
        assert isinstance(result, Claim), result
        row.attempt += 1
        assert (result.attempt, result.generation, result.max_attempts) == (
            row.attempt,
            row.generation,
            row.max_attempts,
        )
        assert result.token not in self.tokens_seen, "a token was reused"
        self.tokens_seen.add(result.token)
        row.token = result.token
        row.lease_live = True
        row.history.append([row.generation, row.attempt, result.token, Outcome.RUNNING])
        held = Held(worker, url, result.token)
        self.held.append(held)
        return held

    def _check_error(self, error: str | None, row: Row) -> None:
        if row.error_is_lost:
            assert error is not None
            assert "worker lost" in error
        else:
            assert error == row.error

    @rule(
        target=claims,
        worker=st.sampled_from(WORKERS),
        url=st.sampled_from(URLS),
        # Mostly the endings that use attempts up, so that the caps are reached often.
        endings=st.lists(
            st.sampled_from(("retry", "crash", "keep", "retry", "crash", "complete", "give_up")),
            min_size=1,
            max_size=3,
        ),
    )
    def execute(self, worker: str, url: str, endings: list[str]) -> Any:
        """Executions one after another: claim, then end one way or another (or keep running)."""
        granted = []
        for then in endings:
            held = self.claim(worker, url)
            if not isinstance(held, Held):
                continue
            granted.append(held)
            if then == "complete":
                self.complete(held, Stats(1, 0, 1))
            elif then in ("retry", "give_up"):
                self.fail(held, retryable=then == "retry")
            elif then == "crash":
                self.expire_lease(url)
        return multiple(*granted)

    @rule(held=claims)
    def heartbeat(self, held: Held) -> None:
        if self.is_current(held):
            left = self.store.heartbeat(held.url, held.token)
            assert left is not None
            assert 0 < left <= LEASE
            self.model[held.url].lease_live = True
        else:
            before = self.snapshot(held.url)
            assert self.store.heartbeat(held.url, held.token) is None
            assert self.snapshot(held.url) == before

    @rule(
        held=claims,
        stats=st.builds(Stats, st.integers(0, 9), st.integers(0, 9), st.integers(0, 9)),
    )
    def complete(self, held: Held, stats: Stats) -> None:
        if self.is_current(held):
            self.store.complete(held.url, held.token, stats)
            row = self.model[held.url]
            row.end_attempt(Outcome.COMPLETED)
            row.status, row.stats, row.lease_live = Status.COMPLETED, stats, False
            row.error, row.error_is_lost = None, False
        else:
            before = self.snapshot(held.url)
            with pytest.raises(errors.LostClaim):
                self.store.complete(held.url, held.token, stats)
            assert self.snapshot(held.url) == before

    @rule(held=claims, retryable=st.booleans())
    def fail(self, held: Held, retryable: bool) -> None:
        message = self.next_error()
        if self.is_current(held):
            result = self.store.fail(held.url, held.token, message, retryable=retryable)
            row = self.model[held.url]
            row.end_attempt(Outcome.FAILED)
            will_retry = retryable and row.attempt < row.max_attempts
            row.status = Status.FAILED if will_retry else Status.DEAD
            row.lease_live = False
            row.error, row.error_is_lost = message, False
            assert (result.status, result.attempt, result.max_attempts) == (
                row.status,
                row.attempt,
                row.max_attempts,
            )
        else:
            before = self.snapshot(held.url)
            with pytest.raises(errors.LostClaim):
                self.store.fail(held.url, held.token, message, retryable=retryable)
            assert self.snapshot(held.url) == before

    @rule(url=st.sampled_from(URLS))
    def expire_lease(self, url: str) -> None:
        row = self.model.get(url)
        live = row is not None and row.status is Status.PROCESSING
        assert expire_lease(self.store, url) is live  # type: ignore[arg-type]
        if row is not None and live:
            row.lease_live = False

    @rule(waiting=st.booleans())
    def reap(self, waiting: bool) -> None:
        # waiting_seconds=0 hands back every pending / failed row; 3600 none of them.
        # The model has no gap rule (test_store_gap_rule.py checks it): a pause of the wall
        # clock between steps (a slow host, a shrinking replay) must not read as the database
        # having been away, which would give expired leases back.
        work = self.store.reap(waiting_seconds=0 if waiting else 3600, gap_seconds=1e9)
        expected = set()
        for url, row in self.model.items():
            if row.status is Status.PROCESSING and not row.lease_live:
                row.end_attempt(Outcome.LOST)
                will_retry = row.attempt < row.max_attempts
                row.status = Status.FAILED if will_retry else Status.DEAD
                row.error, row.error_is_lost = None, True
                expected.add((url, row.status))
        if waiting:
            expected |= {
                (url, row.status)
                for url, row in self.model.items()
                if row.status in (Status.PENDING, Status.FAILED)
            }
        assert {(w.file_url, w.status) for w in work} == expected

    @rule(url=st.sampled_from((None, *URLS)), force=st.booleans())
    def requeue(self, url: str | None, force: bool) -> None:
        work = self.store.requeue(url, force=force)
        movable = {Status.DEAD, Status.FAILED} | ({Status.COMPLETED} if force else set())
        expected = set()
        for u, row in self.model.items():
            if (url is None or u == url) and row.status in movable:
                row.new_generation()
                expected.add(u)
        assert {w.file_url for w in work} == expected
        assert {w.status for w in work} <= {Status.PENDING}

    @rule(url=st.sampled_from(URLS), fingerprint=st.sampled_from((None, "v1", "v2")))
    def register(self, url: str, fingerprint: str | None) -> None:
        (reg,) = self.store.register([(url, fingerprint)], max_attempts=CAPS[url])
        row = self.model.get(url)
        if row is None:
            self.model[url] = Row(Status.PENDING, max_attempts=CAPS[url], fingerprint=fingerprint)
            assert (reg.status, reg.needs_task) == (Status.PENDING, True)
        elif (
            row.status in (Status.COMPLETED, Status.DEAD)
            and fingerprint is not None
            and row.fingerprint is not None
            and fingerprint != row.fingerprint
        ):
            row.new_generation()
            row.fingerprint = fingerprint
            row.max_attempts = CAPS[url]
            assert (reg.status, reg.needs_task) == (Status.PENDING, True)
        else:
            # A row still pending is enqueued again (its message may have been lost).
            assert (reg.status, reg.needs_task) == (row.status, row.status is Status.PENDING)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def rows_match_the_model_with_at_most_one_live_claim(self) -> None:
        for url in URLS:
            row = self.model.get(url)
            got = self.snapshot(url)
            if row is None:
                assert got is None
                continue
            assert got is not None
            assert (got.status, got.attempt, got.max_attempts, got.generation) == (
                row.status,
                row.attempt,
                row.max_attempts,
                row.generation,
            ), url
            assert got.attempt <= got.max_attempts
            assert got.stats == row.stats
            if row.status is not Status.PENDING:
                self._check_error(got.error_message, row)
            # A lease exactly while processing (the database's check constraint, and ours).
            assert (got.lease_expires_at is not None) == (got.status is Status.PROCESSING)
            history = [[a.generation, a.attempt, a.token, a.outcome] for a in got.attempts]
            assert history == row.history, url
            # At most one live claim: one running execution, and it is the row's token.
            running = [a.token for a in got.attempts if a.outcome is Outcome.RUNNING]
            if got.status is Status.PROCESSING:
                assert running == [got.token] == [row.token]
            else:
                assert running == []
        # No two workers believe in the same current claim of a file.
        for url in URLS:
            holders = [h for h in self.held if h.url == url and self.is_current(h)]
            assert len(holders) <= 1, holders


def _run(make_store: Callable[[], Store], how: settings) -> None:
    class Machine(StoreMachine):
        def make_store(self) -> Store:
            return make_store()

    run_state_machine_as_test(Machine, settings=how)


def test_store_machine__postgres_follows_the_model(pg_store: PostgresStore) -> None:
    def fresh() -> Store:
        pg_store.execute_script("TRUNCATE file_checkpoints, file_attempts CASCADE")
        return pg_store

    _run(fresh, PG_SETTINGS)
