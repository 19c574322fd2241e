"""A small in-memory store for unit tests of the producer, watch and display.

It implements the registration side only (register, requeue, get, summary) and logs every
call. The state machine (claim, heartbeat, complete, fail, abandon, reap) lives once, in the
SQL under `sql/`, and is tested there, on PostgreSQL; `mark()` puts a row in the state a
test needs instead.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.models import (
    BatchSpec,
    BatchState,
    Change,
    Checkpoint,
    Registration,
    Stats,
    Status,
    Work,
)
from pipeline.store import DEFAULT_MAX_ATTEMPTS, Registry, requeue_statuses, split_registrations


@dataclasses.dataclass
class _Row:
    file_url: str
    created_at: dt.datetime
    updated_at: dt.datetime
    file_type: str
    max_attempts: int
    task_name: str | None
    batch_id: str | None
    fingerprint: str | None
    status: Status = Status.PENDING
    generation: int = 1
    attempt: int = 0
    stats: Stats = dataclasses.field(default_factory=Stats)
    error_message: str | None = None

    def new_generation(self, now: dt.datetime) -> None:
        self.status = Status.PENDING
        self.generation += 1
        self.attempt = 0
        self.stats = Stats()
        self.error_message = None
        self.updated_at = now


class MemoryStore:
    """Registration in memory: the same answers as queries.sql `register`, `requeue`, `get`
    and `summary` give (the contract suite runs those on both stores)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, _Row] = {}
        #: the batches opened by submit, by name (their settings; states are tested on Postgres)
        self.batches: dict[str, BatchSpec] = {}
        #: every call made, in order: (method name, what it was given: register's (url,
        #: fingerprint) pairs, requeue's filters, the URL or batch of get and summary)
        self.calls: list[tuple[str, Any]] = []

    def mark(
        self, file_url: str, status: Status, *, stats: Stats | None = None, error: str = ""
    ) -> None:
        """Put a registered file in `status` (a test's shortcut through the state machine)."""
        with self._lock:
            row = self._rows[file_url]
            row.status = status
            row.attempt = max(row.attempt, 1)
            row.stats = stats or row.stats
            row.error_message = error or None
            row.updated_at = dt.datetime.now(dt.UTC)

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
        """New URLs are inserted; a changed completed or dead file starts a new generation."""
        pairs = list(split_registrations(urls))
        self.calls.append(("register", pairs))
        # One entry per URL, as the SQL's DISTINCT ON (the first fingerprint given wins here).
        chosen: dict[str, str | None] = {}
        for url, fingerprint in pairs:
            chosen.setdefault(url, fingerprint)
        result: list[Registration] = []
        with self._lock:
            now = dt.datetime.now(dt.UTC)
            for url in sorted(chosen):
                fingerprint = chosen[url]
                row = self._rows.get(url)
                if row is None:
                    self._rows[url] = _Row(
                        url, now, now, file_type, max_attempts, task_name, batch_id, fingerprint
                    )
                    result.append(Registration(url, Status.PENDING, True, task_name, Change.NEW))
                elif (
                    row.status.terminal
                    and fingerprint is not None
                    and row.fingerprint is not None
                    and fingerprint != row.fingerprint
                ):
                    row.new_generation(now)
                    row.fingerprint, row.batch_id = fingerprint, batch_id
                    row.task_name, row.max_attempts = task_name, max_attempts
                    result.append(
                        Registration(url, Status.PENDING, True, task_name, Change.CHANGED)
                    )
                else:
                    # Still pending: enqueued again (its message may have been lost).
                    again = row.status is Status.PENDING
                    result.append(Registration(url, row.status, again, row.task_name))
        if changes_only:
            return [r for r in result if r.change is not Change.UNCHANGED]
        return result

    def open_batch(self, spec: BatchSpec) -> BatchState:
        """Keep the batch's settings (a later submit's settings replace those it gives)."""
        self.calls.append(("open_batch", spec.name))
        with self._lock:
            old = self.batches.get(spec.name)
            if old is not None:
                spec = BatchSpec(
                    spec.name,
                    spec.task_name or old.task_name,
                    spec.submitted_by or old.submitted_by,
                    spec.concurrency or old.concurrency,
                    spec.on_complete or old.on_complete,
                )
            self.batches[spec.name] = spec
        return BatchState.OPEN

    def requeue(
        self,
        file_url: str | None = None,
        *,
        batch_id: str | None = None,
        statuses: Sequence[Status] | None = None,
        force: bool = False,
    ) -> list[Work]:
        """Dead and failed files (completed ones with force) back to pending."""
        self.calls.append(("requeue", {"file_url": file_url, "batch_id": batch_id}))
        allowed = set(requeue_statuses(statuses, force))
        result: list[Work] = []
        with self._lock:
            now = dt.datetime.now(dt.UTC)
            for row in self._rows.values():
                if (
                    row.status not in allowed
                    or (row.status is Status.COMPLETED and not force)
                    or (file_url is not None and row.file_url != file_url)
                    or (batch_id is not None and row.batch_id != batch_id)
                ):
                    continue
                if row.status is Status.CANCELLED:
                    # As the SQL: back to pending as it stood, same generation.
                    row.status, row.updated_at = Status.PENDING, now
                else:
                    row.new_generation(now)
                result.append(Work(row.file_url, row.task_name, row.status))
        return result

    def reap(self, **_: Any) -> list[Work]:
        """Nothing expires in memory: the sweep's rules are tested on PostgreSQL."""
        self.calls.append(("reap", None))
        return []

    def get(self, file_url: str, *, with_attempts: bool = False) -> Checkpoint | None:
        self.calls.append(("get", file_url))
        with self._lock:
            row = self._rows.get(file_url)
            if row is None:
                return None
            return Checkpoint(
                file_url=row.file_url,
                file_type=row.file_type,
                status=row.status,
                attempt=row.attempt,
                max_attempts=row.max_attempts,
                generation=row.generation,
                token=None,
                records_total=row.stats.total,
                records_filtered=row.stats.filtered,
                records_persisted=row.stats.persisted,
                processing_time_ms=0,
                error_message=row.error_message,
                processed_by=None,
                task_name=row.task_name,
                task_id=None,
                batch_id=row.batch_id,
                fingerprint=row.fingerprint,
                lease_expires_at=None,
                started_at=None,
                completed_at=row.updated_at if row.status is Status.COMPLETED else None,
                created_at=row.created_at,
                updated_at=row.updated_at,
            )

    def summary(self, batch_id: str | None = None) -> dict[str | None, dict[Status, int]]:
        """Counts by batch and status."""
        self.calls.append(("summary", batch_id))
        result: dict[str | None, dict[Status, int]] = {}
        with self._lock:
            for row in self._rows.values():
                if batch_id is None or row.batch_id == batch_id:
                    counts = result.setdefault(row.batch_id, {})
                    counts[row.status] = counts.get(row.status, 0) + 1
        return result


if TYPE_CHECKING:

    def _is_a_registry(store: MemoryStore) -> Registry:
        """mypy checks here that MemoryStore implements the Registry Protocol."""
        return store
