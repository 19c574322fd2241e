"""The checkpoint store: its interface, sized by role, and `open_store`.

`postgres.py` is the store (the one module that talks to the database driver, with the SQL
under `sql/`); `memory.py` a small in-memory stand-in for unit tests of the producer, watch
and display. Everything else imports this module only. It may import the shared value objects
and errors, nothing else of pipeline.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from pipeline import errors, masking, settings
from pipeline.models import (
    BatchSpec,
    BatchState,
    Checkpoint,
    ClaimResult,
    FailResult,
    Pruned,
    Registration,
    Stats,
    Status,
    Work,
)
from pipeline.views import Batch, Operations, Overview

DEFAULT_LEASE_SECONDS = 30.0
DEFAULT_MAX_ATTEMPTS = 3
# How long a pending or failed row may wait for its task before the reaper re-enqueues it.
DEFAULT_WAITING_SECONDS = 120.0
# How late a scheduled retry may be before the sweep takes its message for lost and sends
# another (a duplicate costs one claim; a worker busy with other files may start an ETA late).
DEFAULT_OVERDUE_SECONDS = 5.0
# The gap rule: when the database answered nobody of the fleet (no sweep, no worker heartbeat)
# for longer than this, the leases live when the gap began get it back before any is reaped.
# Twice the default sweep interval; the sweep passes twice its own.
DEFAULT_GAP_SECONDS = 10.0
# Fencing tokens a store reserves from the sequence per query (see ClaimPath.reserve_token).
TOKEN_BLOCK = 100


class OutputTransaction(Protocol):
    """A transaction on the checkpoint database in which a task writes its output; it
    commits together with the checkpoint, or not at all."""

    @property
    def connection(self) -> Any:
        """The handle the task writes with (a SQLAlchemy Connection on Postgres)."""

    def execute_many(self, sql: str, rows: Sequence[Mapping[str, Any]]) -> int:
        """One statement (`:name` parameters) for many parameter sets; the rows affected."""
        ...

    def copy_rows(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """Stream rows through `COPY ... FROM STDIN` as they come; the rows copied. An
        exception from `rows` aborts the transaction."""
        ...


class ClaimPath(Protocol):
    """What an execution needs: claim, keep, complete or fail one file; each call is one
    atomic transition."""

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
        """Grant a claim or refuse it.

        `token`: the token a grant gets (from `reserve_token`, so the caller knows it even if
        the reply is lost); `resume_token`: token(s) this task chain held before stepping back:
        if the claim is still one of them, it is handed over under a new token, same attempt.
        """
        ...

    def reserve_token(self) -> int:
        """A fencing token no claim has had, for `claim(token=...)`."""
        ...

    def heartbeat(self, file_url: str, token: int) -> float | None:
        """Extend the lease; the seconds left, or None when the claim was lost."""
        ...

    def complete(
        self,
        file_url: str,
        token: int,
        stats: Stats | Mapping[str, Any] | None = None,
        *,
        processing_time_ms: int | None = None,
        details: Mapping[str, Any] | None = None,
        transaction: OutputTransaction | None = None,
    ) -> Work | None:
        """Mark completed; raises LostClaim when the token is stale (nothing changes). When
        this completion made its file's batch terminal: the batch's callback row it created
        (`batch:NAME#N`); when its batch has a limit: the batch's next held file it released;
        for the caller to send once `transaction` committed."""
        ...

    def commit_chunk(
        self,
        file_url: str,
        token: int,
        position: Any,
        *,
        version: str | None = None,
        stats: Stats | None = None,
        progress_bytes: int | None = None,
        size_bytes: int | None = None,
        transaction: OutputTransaction | None = None,
    ) -> float:
        """Record a chunk: the position it reached (JSON), the object version it was read
        from and the running stats, inside the chunk's output `transaction`, fenced by the
        token; extends the lease. The seconds left on it; 0 when the file's batch was cancelled
        (the chunk committed, and the file stopped there, `cancelled`); LostClaim when the token
        is stale."""
        ...

    def restart(
        self, file_url: str, token: int, version: str | None, fingerprint: str | None = None
    ) -> int:
        """The object changed under a resumed file: a new generation from the beginning under
        the same claim; its number. LostClaim when the token is stale."""
        ...

    def fail(
        self,
        file_url: str,
        token: int,
        error: BaseException | str,
        *,
        retryable: bool = True,
        retry_in: float | None = None,
    ) -> FailResult:
        """Record a failed execution; raises LostClaim when the token is stale.

        With attempts left, the next attempt may not start before `retry_in` seconds from now
        (on the store's clock): a claim before then is refused NOT_DUE."""
        ...

    def abandon(self, file_url: str, worker_id: str, task_id: str | None) -> Status | None:
        """Release the claim held by `worker_id` (a process known to be dead) for `task_id`:
        its attempt is recorded lost and the file moves on as if its lease had expired.
        Returns the new status, or None when that process held no claim on the file."""
        ...

    def get(self, file_url: str, *, with_attempts: bool = False) -> Checkpoint | None: ...

    def record_trace(self, file_url: str, token: int, trace_id: str) -> None:
        """Keep the trace the attempt under `token` runs in on its attempt row (tracing on)."""
        ...

    def transaction(
        self, *, token: int | None = None
    ) -> contextlib.AbstractContextManager[OutputTransaction]:
        """Open a transaction for output; the caller completes inside it, then it commits."""
        ...

    def unavailable(self, error: BaseException) -> bool:
        """Whether an exception raised while using the store means it could not be reached."""
        ...


class Registry(Protocol):
    """What submit, watch, requeue and the sweep need: rows registered, moved on, handed
    back."""

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
        """Register URLs (with their fingerprints) as pending; one Registration per distinct
        URL, or with `changes_only` only for those this call created or regenerated."""
        ...

    def open_batch(self, spec: BatchSpec) -> BatchState:
        """Create a submit's batch row, or update its settings when it exists (a later submit
        under the same name adds files); its state now."""
        ...

    def requeue(
        self,
        file_url: str | None = None,
        *,
        batch_id: str | None = None,
        statuses: Sequence[Status] | None = None,
        force: bool = False,
    ) -> list[Work]:
        """Dead and failed files (completed with `force`) back to pending in a new generation;
        cancelled ones back to pending as they stood (their batch open again)."""
        ...

    def reap(
        self,
        *,
        waiting_seconds: float | None = DEFAULT_WAITING_SECONDS,
        limit: int = 1000,
        overdue_seconds: float = DEFAULT_OVERDUE_SECONDS,
        gap_seconds: float = DEFAULT_GAP_SECONDS,
    ) -> list[Work]:
        """The sweep: move expired claims on; hand back failed rows whose retry is overdue by
        `overdue_seconds` (their message lost); with `waiting_seconds`, also the pending rows
        (and failed ones with no retry time) that waited longer than that (None: skip those),
        or that waited through the last gap. First the gap rule: if the database answered
        nobody for longer than `gap_seconds`, the leases live when the gap began get it back.
        One sweep at a time: a concurrent call returns nothing."""
        ...


class Batches(Protocol):
    """What `cancel`, `pause`, `resume` and `status --batch` do to a batch."""

    def cancel_batch(self, name: str) -> int | None:
        """No claim of the batch's files starts once this returns; its waiting files become
        `cancelled` (running ones at their next chunk, or they finish). How many were
        cancelled now; None when there is no such batch."""
        ...

    def pause_batch(self, name: str) -> BatchState | None:
        """Hold the batch's claims (refused `paused`, no attempt spent); its state after
        (unchanged when cancelled); None when there is no such batch."""
        ...

    def resume_batch(self, name: str) -> list[Work] | None:
        """Release a paused batch: its waiting files, to enqueue again; None when it was not
        paused."""
        ...

    def batch(self, name: str) -> Batch | None:
        """One batch: its row, counts, oldest waiting file and pace, in one read."""
        ...

    def callback_summary(self, file_url: str) -> dict[str, Any] | None:
        """The summary a completion callback (`batch:NAME#N`) runs with: the batch, the
        callback's number, its file count, its files by status and its dead files with their
        errors, as they were when it settled; None when `file_url` is no callback."""
        ...


class Presence(Protocol):
    """A worker's heartbeat, written by its sweep thread, which the metrics count."""

    def worker_seen(self, worker: str, pid: int, interval_seconds: float) -> None:
        """`worker` (a main process) is alive and says so every `interval_seconds`."""
        ...

    def worker_stopped(self, worker: str, pid: int) -> None:
        """A worker's main process stops cleanly: it is no longer counted."""
        ...

    def record_trouble(
        self,
        cause: str,
        message: str,
        seen_by: str | None,
        first_at: dt.datetime,
        last_at: dt.datetime,
    ) -> None:
        """A spell of database trouble a worker saw (`pipeline status` shows it), written once
        the database answers again."""
        ...


class Reports(Protocol):
    """What `status`, `submit --wait` and the metrics read."""

    def summary(self, batch_id: str | None = None) -> dict[str | None, dict[Status, int]]: ...

    def overview(
        self, batch_id: str | None = None, *, dead_limit: int = 10, running_limit: int = 10
    ) -> Overview:
        """Counts, recent throughput, the oldest live lease, the latest dead files and the
        files running, with their progress."""
        ...

    def operations(self, *, window_seconds: float = 900.0, max_batches: int = 20) -> Operations:
        """What the metrics exporter serves: ages, leases, what ended in the last
        `window_seconds`, the workers' heartbeats, and the `max_batches` most active batches."""
        ...

    def get(self, file_url: str, *, with_attempts: bool = False) -> Checkpoint | None: ...


class Admin(Protocol):
    """The schema and the connections."""

    def upgrade(self) -> list[str]:
        """Apply the schema migrations not yet applied; the names of those applied."""
        ...

    def schema_version(self) -> int | None: ...

    def prune(
        self,
        attempts_older_than: float,
        *,
        keep: int = 1,
        forget_completed_older_than: float | None = None,
        batch: int = ...,
        max_batches: int | None = None,
    ) -> Pruned:
        """Delete ended attempts older than the age but each file's `keep` latest; and, asked
        for, the completed files completed before the other age (see pipeline prune). At most
        `max_batches` deletes of `batch` rows if given (`more` says whether some may be left)."""
        ...

    def take_turn(self, chore: str, interval_seconds: float) -> bool:
        """Whether the caller does the periodic `chore` (the sweep's prune) now: true for one
        caller of the whole fleet per interval."""
        ...

    def libpq_url(self) -> tuple[str, str | None]:
        """The database as libpq tools (psql) take it, without its password; and the
        password (for PGPASSWORD, never argv)."""
        ...

    def after_fork(self) -> None:
        """Drop connections inherited from a parent process."""
        ...

    def close(self) -> None: ...


class Store(ClaimPath, Registry, Batches, Presence, Reports, Admin, Protocol):
    """The whole store: every role above."""


def preload() -> None:
    """Import the PostgreSQL store now (SQLAlchemy, psycopg, the dialect of output
    transactions) and compile its queries: a worker's main process does, before its pool
    forks, so that no pool process pays for it on its first task."""
    from pipeline.store.postgres import sqltext

    sqltext.warm()


def open_store(database_url: str | None = None) -> Store:
    """The checkpoint store on the given Postgres URL (default: PIPELINE_DATABASE_URL)."""
    from pipeline.store.postgres import PostgresStore  # the driver loads only when needed

    url = database_url or settings.DATABASE_URL.get()
    if not url:
        raise errors.PipelineError(
            f"no database URL given and {settings.DATABASE_URL.name} is not set"
        )
    return PostgresStore(url)


def error_text(error: BaseException | str) -> tuple[str, str]:
    """The (class name, message) pair recorded for an error, any `scheme://user:pw@` in it
    masked (the row's error is shown by `status`, in Flower and in metrics)."""
    if isinstance(error, BaseException):
        message = str(error) or type(error).__name__
        return type(error).__name__, masking.scrub(message[:4000])
    return "Error", masking.scrub(error[:4000])


def split_registrations(
    urls: Iterable[str | tuple[str, str | None]],
) -> Iterator[tuple[str, str | None]]:
    """Yield (url, fingerprint) pairs from plain URLs or pairs."""
    for item in urls:
        if isinstance(item, str):
            yield item, None
        else:
            yield item[0], item[1]


def requeue_statuses(statuses: Sequence[Status] | None, force: bool) -> list[Status]:
    """The statuses a requeue may move: dead, failed and cancelled, and completed only with
    force."""
    chosen = list(statuses) if statuses else [Status.DEAD, Status.FAILED, Status.CANCELLED]
    if force and not statuses:
        chosen.append(Status.COMPLETED)
    movable = (Status.DEAD, Status.FAILED, Status.COMPLETED, Status.CANCELLED)
    return [s for s in chosen if s in movable]


def resume_tokens(resume: int | Sequence[int] | None) -> list[int] | None:
    """The resume token(s) of a claim as a list (None: none)."""
    if resume is None:
        return None
    if isinstance(resume, int):
        return [resume]
    return [int(t) for t in resume] or None
