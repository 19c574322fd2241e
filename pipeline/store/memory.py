"""An in-memory twin of the PostgreSQL store, for tests: same Protocol, same transitions.

`MemoryStore` follows the SQL in `sql/` step for step (the contract suite in
tests/integration runs over both and keeps them in step). Each method holds one lock for
the whole transition, the way each Postgres call is one atomic statement; the clock is a
callable so tests can move time on instead of sleeping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pipeline import errors
from pipeline.models import (
    Attempt,
    Change,
    Checkpoint,
    Claim,
    ClaimResult,
    DeadFile,
    FailResult,
    Outcome,
    Overview,
    Reason,
    Refusal,
    Registration,
    Stats,
    Status,
    Work,
)
from pipeline.store import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_OVERDUE_SECONDS,
    DEFAULT_WAITING_SECONDS,
    OutputTransaction,
    Store,
    error_text,
    requeue_statuses,
    resume_tokens,
    split_registrations,
)

#: What a clock returns: seconds since the epoch, or an aware datetime.
Clock = Callable[[], float | dt.datetime]

# Expiring a lease puts it this far in the past, as the Postgres helper below does.
_EXPIRED_BY = dt.timedelta(seconds=1)


def system_clock() -> dt.datetime:
    """The wall clock, in UTC."""
    return dt.datetime.now(dt.UTC)


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start: dt.datetime | float | None = None) -> None:
        if start is None:
            start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        self._now = _as_datetime(start)
        self._lock = threading.Lock()

    def __call__(self) -> dt.datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> dt.datetime:
        """Move time on by `seconds`; returns the new time."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        with self._lock:
            self._now += dt.timedelta(seconds=seconds)
            return self._now


def _as_datetime(value: float | dt.datetime) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
    return dt.datetime.fromtimestamp(value, dt.UTC)


def _text(value: object) -> str:
    """Postgres `format('%s', x)`: NULL prints as the empty string."""
    return "" if value is None else str(value)


@dataclasses.dataclass
class _Row:
    """One `file_checkpoints` row, with the columns the store reads or writes."""

    file_url: str
    created_at: dt.datetime
    updated_at: dt.datetime
    file_type: str = "unknown"
    status: Status = Status.PENDING
    records_total: int = 0
    records_filtered: int = 0
    records_persisted: int = 0
    processing_time_ms: int = 0
    error_message: str | None = None
    attempt: int = 0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    processed_by: str | None = None
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    generation: int = 1
    token: int | None = None
    lease_seconds: float | None = None
    lease_expires_at: dt.datetime | None = None
    retry_at: dt.datetime | None = None
    task_name: str | None = None
    task_id: str | None = None
    batch_id: str | None = None
    fingerprint: str | None = None
    details: Any = None

    def copy(self) -> _Row:
        return dataclasses.replace(self)


@dataclasses.dataclass
class _AttemptRow:
    """One `file_attempts` row."""

    token: int
    generation: int
    attempt: int
    worker: str | None
    task_id: str | None
    started_at: dt.datetime
    ended_at: dt.datetime | None = None
    outcome: Outcome = Outcome.RUNNING
    error_class: str | None = None
    error_message: str | None = None

    def copy(self) -> _AttemptRow:
        return dataclasses.replace(self)

    def freeze(self) -> Attempt:
        return Attempt(
            generation=self.generation,
            attempt=self.attempt,
            token=self.token,
            worker=self.worker,
            started_at=self.started_at,
            ended_at=self.ended_at,
            outcome=self.outcome,
            error_class=self.error_class,
            error_message=self.error_message,
        )


@dataclasses.dataclass
class _Undo:
    """What a completion inside a transaction changed, to put back if the transaction fails."""

    file_url: str
    row_before: _Row
    attempt_before: _AttemptRow | None
    row_after: _Row


@dataclasses.dataclass
class MemoryTransaction:
    """The in-memory store's output transaction: nothing to write through (`connection` is None).

    A completion made inside it is undone when the `with` block raises, as the Postgres
    transaction rolls back `completed` together with the output.
    """

    connection: Any = None
    _store: MemoryStore | None = None
    _undo: list[_Undo] = dataclasses.field(default_factory=list)
    _open: bool = True


class MemoryStore:
    """The checkpoint store in memory, for tests; behaves as the PostgreSQL store does."""

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock: Clock = clock or system_clock
        # One lock for everything: each method is one transition, as each SQL call is one
        # statement; a finer lock would only matter for a fake.
        self._lock = threading.Lock()
        self._rows: dict[str, _Row] = {}
        self._attempts: dict[str, list[_AttemptRow]] = {}
        # file_checkpoints_token_seq: tokens are never reused, across files and generations.
        self._tokens = itertools.count(1)

    # -- test helpers -----------------------------------------------------------------------

    def now(self) -> dt.datetime:
        """The store's current time, from its clock."""
        return _as_datetime(self._clock())

    def expire_lease(self, file_url: str) -> bool:
        """Put a live claim's lease in the past (as a crashed worker's would be); False if none."""
        with self._lock:
            row = self._rows.get(file_url)
            if row is None or row.status is not Status.PROCESSING:
                return False
            row.lease_expires_at = self.now() - _EXPIRED_BY
            return True

    def backdate_retry(self, file_url: str, seconds: float) -> bool:
        """Put a failed row's retry time `seconds` in the past; False if it has none."""
        with self._lock:
            row = self._rows.get(file_url)
            if row is None or row.status is not Status.FAILED or row.retry_at is None:
                return False
            row.retry_at = self.now() - dt.timedelta(seconds=seconds)
            return True

    def clear(self) -> None:
        """Forget every row (the TRUNCATE of the Postgres tests)."""
        with self._lock:
            self._rows.clear()
            self._attempts.clear()

    # -- plumbing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, *, token: int | None = None) -> Iterator[MemoryTransaction]:
        """A transaction for output; `token` names no session here (nothing to fence)."""
        tx = MemoryTransaction(_store=self)
        try:
            yield tx
        except BaseException:
            self._rollback(tx)
            raise
        finally:
            tx._open = False

    def _rollback(self, tx: MemoryTransaction) -> None:
        with self._lock:
            for undo in reversed(tx._undo):
                row = self._rows.get(undo.file_url)
                # Put the row back only if nothing moved it on since (in Postgres nothing could:
                # the completion holds the row's lock until the transaction ends).
                if row is None or row != undo.row_after:
                    continue
                self._rows[undo.file_url] = undo.row_before
                if undo.attempt_before is not None:
                    history = self._attempts[undo.file_url]
                    for i, attempt in enumerate(history):
                        if attempt.token == undo.attempt_before.token:
                            history[i] = undo.attempt_before
            tx._undo.clear()

    def unavailable(self, error: BaseException) -> bool:
        """Whether `error` means the store could not be reached (never, in memory, unless told)."""
        return isinstance(error, errors.StoreUnavailable)

    def upgrade(self) -> list[str]:
        """Nothing to apply: the twin has no schema."""
        return []

    def schema_version(self) -> int | None:
        """None: the twin has no schema to version."""
        return None

    def after_fork(self) -> None:
        """Nothing to drop: the rows live in this process only."""

    def close(self) -> None:
        """Nothing to close."""

    # -- transitions (each mirrors the SQL named in its docstring) --------------------------

    def claim(
        self,
        file_url: str,
        worker_id: str,
        lease_seconds: float | None = None,
        *,
        max_attempts: int | None = None,
        file_type: str | None = None,
        task_name: str | None = None,
        task_id: str | None = None,
        resume_token: int | Sequence[int] | None = None,
        token: int | None = None,
    ) -> ClaimResult:
        """pipeline_claim_v2: grant (insert or take over), or refuse with done / busy /
        not_due / dead.

        `token`: the token a grant gets (reserved in advance); `resume_token`: if the claim is
        still one of those tokens, it is handed over under a new token, same attempt (a task
        chain stepping back and resuming).
        """
        resume = resume_tokens(resume_token) or []
        lease = float(lease_seconds or DEFAULT_LEASE_SECONDS)
        if max_attempts is not None and max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        with self._lock:
            now = self.now()
            row = self._rows.get(file_url)
            if row is None:
                # First sight of the file: insert it already claimed.
                row = _Row(
                    file_url=file_url,
                    created_at=now,
                    updated_at=now,
                    file_type=file_type or "unknown",
                    status=Status.PROCESSING,
                    attempt=1,
                    max_attempts=max_attempts or DEFAULT_MAX_ATTEMPTS,
                    token=token if token is not None else next(self._tokens),
                    lease_seconds=lease,
                    lease_expires_at=now + dt.timedelta(seconds=lease),
                    processed_by=worker_id,
                    task_name=task_name,
                    task_id=task_id,
                    started_at=now,
                )
                self._rows[file_url] = row
                return self._granted(row, worker_id, task_id, now)

            cap = max_attempts if max_attempts is not None else row.max_attempts
            if row.status is Status.PROCESSING and row.token in resume:
                # The execution that held the token has ended (it scheduled us); a duplicate
                # carrying the same token finds it already swapped and is refused below.
                old_token = row.token
                row.token = token if token is not None else next(self._tokens)
                row.lease_seconds = lease
                row.lease_expires_at = now + dt.timedelta(seconds=lease)
                row.processed_by = worker_id
                row.task_id = task_id
                row.updated_at = now
                attempt = self._attempt(file_url, old_token)
                if attempt is not None:
                    attempt.token = row.token
                    attempt.worker = worker_id
                    attempt.task_id = task_id
                return self._claim_of(row)
            if row.status is Status.COMPLETED:
                stats = Stats(row.records_total, row.records_filtered, row.records_persisted)
                return Refusal(file_url, Reason.DONE, stats=stats)
            if row.status is Status.DEAD:
                return Refusal(file_url, Reason.DEAD, error=row.error_message)
            was_processing = row.status is Status.PROCESSING
            if was_processing:
                assert row.lease_expires_at is not None
                if row.lease_expires_at > now:
                    left = (row.lease_expires_at - now).total_seconds()
                    return Refusal(file_url, Reason.BUSY, retry_in=max(left, 0.0))
                # The holder's lease ran out: its execution is lost and counts as an attempt.
                self._mark_lost(row, now)
            elif (
                row.status is Status.FAILED
                and row.retry_at is not None
                and row.retry_at > now
                and row.attempt < cap
            ):
                # Its backoff is not over: the early delivery is dropped.
                left = (row.retry_at - now).total_seconds()
                return Refusal(file_url, Reason.NOT_DUE, retry_in=left, error=row.error_message)

            if row.attempt >= cap:
                # No attempt left (a lost last attempt, or a cap lowered since): dead.
                row.status = Status.DEAD
                row.lease_expires_at = None
                row.retry_at = None
                row.max_attempts = cap
                row.updated_at = now
                if was_processing:
                    row.error_message = (
                        f"worker lost: lease expired on attempt {row.attempt} of {cap} "
                        f"(held by {_text(row.processed_by)})"
                    )
                elif row.error_message is None:
                    row.error_message = f"no attempts left ({row.attempt} of {cap} used)"
                return Refusal(file_url, Reason.DEAD, error=row.error_message)

            # pending, failed with attempts left, or a lost claim with attempts left: take it.
            row.status = Status.PROCESSING
            row.attempt += 1
            row.max_attempts = cap
            row.token = token if token is not None else next(self._tokens)
            row.lease_seconds = lease
            row.lease_expires_at = now + dt.timedelta(seconds=lease)
            row.retry_at = None
            row.processed_by = worker_id
            row.task_name = task_name if task_name is not None else row.task_name
            row.task_id = task_id
            row.file_type = file_type if file_type is not None else row.file_type
            row.started_at = now
            row.updated_at = now
            return self._granted(row, worker_id, task_id, now)

    def _granted(self, row: _Row, worker_id: str, task_id: str | None, now: dt.datetime) -> Claim:
        assert row.token is not None
        self._attempts.setdefault(row.file_url, []).append(
            _AttemptRow(
                token=row.token,
                generation=row.generation,
                attempt=row.attempt,
                worker=worker_id,
                task_id=task_id,
                started_at=now,
            )
        )
        return self._claim_of(row)

    @staticmethod
    def _claim_of(row: _Row) -> Claim:
        assert row.token is not None
        return Claim(
            file_url=row.file_url,
            token=row.token,
            attempt=row.attempt,
            max_attempts=row.max_attempts,
            lease_seconds=float(row.lease_seconds or DEFAULT_LEASE_SECONDS),
            generation=row.generation,
        )

    def _attempt(self, file_url: str, token: int | None) -> _AttemptRow | None:
        for attempt in self._attempts.get(file_url, ()):
            if attempt.token == token:
                return attempt
        return None

    def _mark_lost(self, row: _Row, now: dt.datetime, message: str | None = None) -> None:
        """Record the current claim's running attempt as lost (default: its lease expired)."""
        attempt = self._attempt(row.file_url, row.token)
        if attempt is not None and attempt.outcome is Outcome.RUNNING:
            attempt.outcome = Outcome.LOST
            attempt.ended_at = now
            attempt.error_class = "WorkerLost"
            attempt.error_message = message or (
                f"lease expired at {row.lease_expires_at}; worker {_text(row.processed_by)} lost"
            )

    def _held(self, file_url: str, token: int) -> _Row | None:
        """The row if `token` is its current claim (the fence of every write), else None."""
        row = self._rows.get(file_url)
        if row is None or row.token != token or row.status is not Status.PROCESSING:
            return None
        return row

    def reserve_token(self) -> int:
        """A token no claim has had (the sequence, as on Postgres)."""
        with self._lock:
            return next(self._tokens)

    def heartbeat(self, file_url: str, token: int) -> float | None:
        """queries.sql `heartbeat`: extend the lease of the current claim."""
        with self._lock:
            row = self._held(file_url, token)
            if row is None:
                return None
            now = self.now()
            seconds = float(row.lease_seconds or 0.0)
            row.lease_expires_at = now + dt.timedelta(seconds=seconds)
            row.updated_at = now
            return seconds

    def complete(
        self,
        file_url: str,
        token: int,
        stats: Stats | Mapping[str, Any] | None = None,
        *,
        processing_time_ms: int | None = None,
        details: Mapping[str, Any] | None = None,
        transaction: OutputTransaction | None = None,
    ) -> None:
        """pipeline_complete_v1: mark the current claim completed with its stats."""
        s = Stats.coerce(stats)
        # Stored as jsonb in Postgres: what JSON cannot hold is refused there too.
        stored_details = json.loads(json.dumps(details)) if details is not None else None
        tx = transaction if isinstance(transaction, MemoryTransaction) else None
        if tx is not None and (not tx._open or tx._store is not self):
            raise errors.PipelineError("the transaction is closed or belongs to another store")
        with self._lock:
            row = self._held(file_url, token)
            if row is None:
                raise errors.LostClaim.of(file_url, token, "completion not applied")
            now = self.now()
            attempt = self._attempt(file_url, token)
            row_before = row.copy()
            attempt_before = attempt.copy() if attempt is not None else None
            if processing_time_ms is None:
                assert row.started_at is not None
                # Postgres rounds numeric to integer half away from zero.
                elapsed = (now - row.started_at).total_seconds() * 1000
                processing_time_ms = math.floor(elapsed + 0.5)
            row.status = Status.COMPLETED
            row.records_total = s.total
            row.records_filtered = s.filtered
            row.records_persisted = s.persisted
            row.processing_time_ms = processing_time_ms
            row.details = stored_details if stored_details is not None else row.details
            row.error_message = None
            row.lease_expires_at = None
            row.retry_at = None
            row.completed_at = now
            row.updated_at = now
            if attempt is not None:
                attempt.outcome = Outcome.COMPLETED
                attempt.ended_at = now
            if tx is not None:
                tx._undo.append(_Undo(file_url, row_before, attempt_before, row.copy()))

    def fail(
        self,
        file_url: str,
        token: int,
        error: BaseException | str,
        *,
        retryable: bool = True,
        retry_in: float | None = None,
    ) -> FailResult:
        """pipeline_fail_v2: failed if retryable with attempts left (next attempt due in
        `retry_in` seconds), else dead."""
        error_class, message = error_text(error)
        with self._lock:
            row = self._held(file_url, token)
            if row is None:
                raise errors.LostClaim.of(file_url, token, "failure not recorded")
            now = self.now()
            will_retry = retryable and row.attempt < row.max_attempts
            row.status = Status.FAILED if will_retry else Status.DEAD
            wait = max(retry_in, 0.0) if will_retry and retry_in is not None else None
            row.retry_at = now + dt.timedelta(seconds=wait) if wait is not None else None
            row.error_message = message
            row.lease_expires_at = None
            row.updated_at = now
            attempt = self._attempt(file_url, token)
            if attempt is not None:
                attempt.outcome = Outcome.FAILED
                attempt.ended_at = now
                attempt.error_class = error_class
                attempt.error_message = message
            return FailResult(row.status, row.attempt, row.max_attempts, retry_in=wait)

    def abandon(self, file_url: str, worker_id: str, task_id: str | None) -> Status | None:
        """pipeline_abandon_v1: release the claim of a process known to be dead."""
        with self._lock:
            row = self._rows.get(file_url)
            if (
                row is None
                or row.status is not Status.PROCESSING
                or row.processed_by != worker_id
                or row.task_id != task_id
            ):
                return None  # completed, failed or taken over already
            now = self.now()
            self._mark_lost(row, now, f"process {worker_id} died while running the file")
            where = f"attempt {row.attempt} of {row.max_attempts}"
            if row.attempt < row.max_attempts:
                row.status = Status.FAILED
                # due at once: Celery requeues the message (the sweep, if it never comes)
                row.retry_at = now
                row.error_message = f"worker process {worker_id} died on {where}; will retry"
            else:
                row.status = Status.DEAD
                row.error_message = f"worker lost: process {worker_id} died on {where}"
            row.lease_expires_at = None
            row.updated_at = now
            return row.status

    def get(self, file_url: str, *, with_attempts: bool = False) -> Checkpoint | None:
        """queries.sql `get` (and `attempts`, oldest first)."""
        with self._lock:
            row = self._rows.get(file_url)
            if row is None:
                return None
            attempts: tuple[Attempt, ...] = ()
            if with_attempts:
                history = sorted(self._attempts.get(file_url, ()), key=lambda a: a.token)
                attempts = tuple(a.freeze() for a in history)
            return Checkpoint(
                file_url=row.file_url,
                file_type=row.file_type,
                status=row.status,
                attempt=row.attempt,
                max_attempts=row.max_attempts,
                generation=row.generation,
                token=row.token,
                records_total=row.records_total,
                records_filtered=row.records_filtered,
                records_persisted=row.records_persisted,
                processing_time_ms=row.processing_time_ms,
                error_message=row.error_message,
                processed_by=row.processed_by,
                task_name=row.task_name,
                task_id=row.task_id,
                batch_id=row.batch_id,
                fingerprint=row.fingerprint,
                lease_expires_at=row.lease_expires_at,
                retry_at=row.retry_at,
                started_at=row.started_at,
                completed_at=row.completed_at,
                created_at=row.created_at,
                updated_at=row.updated_at,
                attempts=attempts,
            )

    def register(
        self,
        urls: Iterable[str | tuple[str, str | None]],
        *,
        batch_id: str | None = None,
        file_type: str = "unknown",
        task_name: str | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        changes_only: bool = False,
    ) -> list[Registration]:
        """queries.sql `register`: insert new URLs; a changed completed/dead file regenerates."""
        # One entry per URL, as the SQL's DISTINCT ON (the first fingerprint given wins here).
        chosen: dict[str, str | None] = {}
        for url, fingerprint in split_registrations(urls):
            chosen.setdefault(url, fingerprint)
        result: list[Registration] = []
        with self._lock:
            now = self.now()
            for url in sorted(chosen):
                fingerprint = chosen[url]
                row = self._rows.get(url)
                if row is None:
                    self._rows[url] = _Row(
                        file_url=url,
                        created_at=now,
                        updated_at=now,
                        file_type=file_type,
                        max_attempts=max_attempts,
                        task_name=task_name,
                        batch_id=batch_id,
                        fingerprint=fingerprint,
                    )
                    result.append(Registration(url, Status.PENDING, True, task_name, Change.NEW))
                elif (
                    row.status in (Status.COMPLETED, Status.DEAD)
                    and fingerprint is not None
                    and row.fingerprint is not None
                    and fingerprint != row.fingerprint
                ):
                    # The content changed since it was done: a new generation.
                    self._new_generation(row, now)
                    row.fingerprint = fingerprint
                    row.batch_id = batch_id
                    row.task_name = task_name
                    row.max_attempts = max_attempts
                    result.append(
                        Registration(url, Status.PENDING, True, task_name, Change.CHANGED)
                    )
                else:
                    # Still pending: enqueued again, as queries.sql `register` does.
                    again = row.status is Status.PENDING
                    result.append(Registration(url, row.status, again, row.task_name))
        if changes_only:
            return [r for r in result if r.change is not Change.UNCHANGED]
        return result

    @staticmethod
    def _new_generation(row: _Row, now: dt.datetime) -> None:
        row.status = Status.PENDING
        row.attempt = 0
        row.generation += 1
        row.token = None
        row.lease_expires_at = None
        row.retry_at = None
        row.error_message = None
        row.completed_at = None
        row.records_total = row.records_filtered = row.records_persisted = 0
        row.processing_time_ms = 0
        row.details = None
        row.updated_at = now

    def requeue(
        self,
        file_url: str | None = None,
        *,
        batch_id: str | None = None,
        statuses: Sequence[Status] | None = None,
        force: bool = False,
    ) -> list[Work]:
        """queries.sql `requeue`: dead / failed (completed with force) back to pending."""
        allowed = set(requeue_statuses(statuses, force))
        result: list[Work] = []
        with self._lock:
            now = self.now()
            for row in self._rows.values():
                if row.status not in allowed:
                    continue
                if row.status is Status.COMPLETED and not force:
                    continue
                if file_url is not None and row.file_url != file_url:
                    continue
                if batch_id is not None and row.batch_id != batch_id:
                    continue
                self._new_generation(row, now)
                result.append(Work(row.file_url, row.task_name, row.status))
        return result

    def reap(
        self,
        *,
        waiting_seconds: float | None = DEFAULT_WAITING_SECONDS,
        limit: int = 1000,
        overdue_seconds: float = DEFAULT_OVERDUE_SECONDS,
    ) -> list[Work]:
        """pipeline_reap_v2: expired claims move on; overdue retries and rows waiting too
        long are handed back."""
        result: list[Work] = []
        with self._lock:
            now = self.now()
            expired = sorted(
                (
                    r
                    for r in self._rows.values()
                    if r.status is Status.PROCESSING
                    and r.lease_expires_at is not None
                    and r.lease_expires_at <= now
                ),
                key=lambda r: r.lease_expires_at or now,
            )[:limit]
            for row in expired:
                self._mark_lost(row, now)
                holder = _text(row.processed_by)
                where = f"attempt {row.attempt} of {row.max_attempts} (held by {holder})"
                if row.attempt < row.max_attempts:
                    row.status = Status.FAILED
                    row.error_message = f"worker lost on {where}; will retry"
                else:
                    row.status = Status.DEAD
                    row.error_message = f"worker lost: lease expired on {where}"
                row.lease_expires_at = None
                row.retry_at = None
                row.updated_at = now
                result.append(Work(row.file_url, row.task_name, row.status))

            # Failed rows whose retry is overdue (their message lost): handed back once; with
            # retry_at cleared they then wait like pending rows.
            overdue_cut = now - dt.timedelta(seconds=overdue_seconds)
            overdue = sorted(
                (
                    r
                    for r in self._rows.values()
                    if r.status is Status.FAILED
                    and r.retry_at is not None
                    and r.retry_at < overdue_cut
                ),
                key=lambda r: r.retry_at or now,
            )[:limit]
            for row in overdue:
                row.retry_at = None
                row.updated_at = now
                result.append(Work(row.file_url, row.task_name, row.status))

            # A second statement in the SQL, which skips the rows just moved (their updated_at
            # is the statement's now()), so nothing is handed back twice.
            if waiting_seconds is None:
                return result
            moved = {id(r) for r in (*expired, *overdue)}
            cutoff = now - dt.timedelta(seconds=waiting_seconds)
            waiting = sorted(
                (
                    r
                    for r in self._rows.values()
                    if (
                        r.status is Status.PENDING
                        or (r.status is Status.FAILED and r.retry_at is None)
                    )
                    and r.updated_at <= cutoff
                    and id(r) not in moved
                ),
                key=lambda r: r.updated_at,
            )[:limit]
            for row in waiting:
                # Touch the row so the next sweep waits another waiting_seconds.
                row.updated_at = now
                result.append(Work(row.file_url, row.task_name, row.status))
        return result

    def summary(self, batch_id: str | None = None) -> dict[str | None, dict[Status, int]]:
        """queries.sql `summary`: counts by batch and status."""
        result: dict[str | None, dict[Status, int]] = {}
        with self._lock:
            for row in self._rows.values():
                if batch_id is not None and row.batch_id != batch_id:
                    continue
                counts = result.setdefault(row.batch_id, {})
                counts[row.status] = counts.get(row.status, 0) + 1
        return result

    def overview(self, batch_id: str | None = None, *, dead_limit: int = 10) -> Overview:
        """queries.sql `activity`, `dead` and `totals`: what `pipeline status` shows."""
        counts = self.summary(batch_id)
        with self._lock:
            now = self.now()
            rows = [r for r in self._rows.values() if batch_id is None or r.batch_id == batch_id]
            minute_ago = now - dt.timedelta(seconds=60)
            completed_last_minute = sum(
                1
                for r in rows
                if r.status is Status.COMPLETED
                and r.completed_at is not None
                and r.completed_at > minute_ago
            )
            live_starts = [
                r.started_at
                for r in rows
                if r.status is Status.PROCESSING
                and r.lease_expires_at is not None
                and r.lease_expires_at > now
                and r.started_at is not None
            ]
            expired = sum(
                1
                for r in rows
                if r.status is Status.PROCESSING
                and r.lease_expires_at is not None
                and r.lease_expires_at <= now
            )
            dead_rows = sorted(
                (r for r in rows if r.status is Status.DEAD),
                key=lambda r: r.updated_at,
                reverse=True,
            )[:dead_limit]
            dead = tuple(
                DeadFile(r.file_url, r.error_message, r.updated_at, r.attempt) for r in dead_rows
            )
            records = None
            seconds = None
            if batch_id is not None:
                done = [r for r in rows if r.status is Status.COMPLETED]
                records = Stats(
                    sum(r.records_total for r in done),
                    sum(r.records_filtered for r in done),
                    sum(r.records_persisted for r in done),
                )
                starts = [r.started_at for r in rows if r.started_at is not None]
                ends = [r.completed_at for r in done if r.completed_at is not None] + [
                    r.updated_at for r in rows if r.status is Status.DEAD
                ]
                if starts and ends:
                    seconds = (max(ends) - min(starts)).total_seconds()
        return Overview(
            counts=counts,
            completed_last_minute=completed_last_minute,
            oldest_live_lease_age=(now - min(live_starts)).total_seconds() if live_starts else None,
            expired_leases=expired,
            dead=dead,
            records=records,
            batch_seconds=seconds,
        )

    def attempt_outcomes(self) -> dict[str, int]:
        """queries.sql `attempt_outcomes`: executions by outcome."""
        result: dict[str, int] = {}
        with self._lock:
            for history in self._attempts.values():
                for attempt in history:
                    result[attempt.outcome.value] = result.get(attempt.outcome.value, 0) + 1
        return result


class _SupportsScalar(Protocol):
    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any: ...


_EXPIRE_SQL = (
    "UPDATE file_checkpoints SET lease_expires_at = now() - interval '1 second'"
    " WHERE file_url = :file_url AND status = 'processing' RETURNING file_url"
)


def expire_lease(store: MemoryStore | _SupportsScalar, file_url: str) -> bool:
    """Put a live claim's lease in the past, on either store; False when there is no claim.

    On Postgres this is one UPDATE on the database's clock, so the next claim or reap sees
    the lease expired as it would after a worker's crash.
    """
    if isinstance(store, MemoryStore):
        return store.expire_lease(file_url)
    return store.scalar(_EXPIRE_SQL, {"file_url": file_url}) is not None


_BACKDATE_SQL = (
    "UPDATE file_checkpoints SET retry_at = clock_timestamp() - make_interval(secs => :s)"
    " WHERE file_url = :file_url AND status = 'failed' AND retry_at IS NOT NULL"
    " RETURNING file_url"
)


def backdate_retry(store: MemoryStore | _SupportsScalar, file_url: str, seconds: float) -> bool:
    """Put a failed row's retry time `seconds` in the past, on either store (as if its backoff
    had run out that long ago); False when it has no retry time."""
    if isinstance(store, MemoryStore):
        return store.backdate_retry(file_url, seconds)
    return store.scalar(_BACKDATE_SQL, {"file_url": file_url, "s": seconds}) is not None


if TYPE_CHECKING:

    def _is_a_store(store: MemoryStore) -> Store:
        """mypy checks here that MemoryStore implements the Store Protocol."""
        return store
