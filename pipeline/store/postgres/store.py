"""The checkpoint store on PostgreSQL: every transition one statement or one plpgsql
function call (see `sql/`), so the database decides, under the row's lock and on its own
clock; nothing is read here and written back."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pipeline import errors
from pipeline.models import (
    Change,
    Claim,
    ClaimResult,
    FailResult,
    Reason,
    Refusal,
    Registration,
    Stats,
    Status,
    Work,
)
from pipeline.store import (
    DEFAULT_GAP_SECONDS,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_OVERDUE_SECONDS,
    DEFAULT_WAITING_SECONDS,
    TOKEN_BLOCK,
    error_text,
    requeue_statuses,
    resume_tokens,
    split_registrations,
)
from pipeline.store.postgres.batches import BatchRows
from pipeline.store.postgres.operations import OperationsReads
from pipeline.store.postgres.prune import Pruning
from pipeline.store.postgres.reports import Reports
from pipeline.store.postgres.schema import Schema
from pipeline.store.postgres.sqltext import libpq_url


def _granted(file_url: str, lease: float, row: Any) -> ClaimResult:
    return Claim(
        file_url=file_url,
        token=row.token,
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        lease_seconds=lease,
        generation=row.generation,
        position=row.position,
        version=row.position_version,
        stats=Stats(row.records_total, row.records_filtered, row.records_persisted),
    )


def _done(file_url: str, lease: float, row: Any) -> ClaimResult:
    stats = Stats(row.records_total, row.records_filtered, row.records_persisted)
    return Refusal(file_url, Reason.DONE, stats=stats)


def _busy(file_url: str, lease: float, row: Any) -> ClaimResult:
    return Refusal(file_url, Reason.BUSY, retry_in=max(float(row.retry_in), 0.0))


def _not_due(file_url: str, lease: float, row: Any) -> ClaimResult:
    retry_in = max(float(row.retry_in), 0.0)
    return Refusal(file_url, Reason.NOT_DUE, retry_in=retry_in, error=row.error_message)


def _dead(file_url: str, lease: float, row: Any) -> ClaimResult:
    return Refusal(file_url, Reason.DEAD, error=row.error_message)


def _cancelled(file_url: str, lease: float, row: Any) -> ClaimResult:
    return Refusal(file_url, Reason.CANCELLED)


def _paused(file_url: str, lease: float, row: Any) -> ClaimResult:
    return Refusal(file_url, Reason.PAUSED)


def _limited(file_url: str, lease: float, row: Any) -> ClaimResult:
    # held by the database until one of its batch's files ends (migration 0023): no time
    return Refusal(file_url, Reason.LIMITED)


# What pipeline_claim answers, and the result each outcome becomes; anything else raises.
_CLAIM_OUTCOMES: dict[str, Callable[[str, float, Any], ClaimResult]] = {
    "granted": _granted,
    "done": _done,
    "busy": _busy,
    "not_due": _not_due,
    "dead": _dead,
    "cancelled": _cancelled,
    "paused": _paused,
    "limited": _limited,
}

_STATUSES: dict[str, Status] = {s.value: s for s in Status}
_CHANGES: dict[str, Change] = {c.value: c for c in Change}


class PostgresStore(Reports, OperationsReads, BatchRows, Pruning, Schema):
    """The checkpoint store on PostgreSQL."""

    def libpq_url(self) -> tuple[str, str | None]:
        return libpq_url(self.url)

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
        lease = float(lease_seconds or DEFAULT_LEASE_SECONDS)
        (row,) = self._fast(
            "claim",
            {
                "file_url": file_url,
                "worker": worker_id,
                "lease_seconds": lease,
                "max_attempts": max_attempts,
                "file_type": file_type,
                "task_name": task_name,
                "task_id": task_id,
                "resume_tokens": resume_tokens(resume_token),
                "token": token,
            },
        )
        build = _CLAIM_OUTCOMES.get(row.outcome)
        if build is None:
            # A function newer than this code answered: failing loudly beats guessing (a
            # guess of "dead" would kill the file).
            raise errors.PipelineError(
                f"unknown claim outcome {row.outcome!r} for {file_url}: is the code older than "
                "the schema?"
            )
        return build(file_url, lease, row)

    def reserve_token(self) -> int:
        # Taken from the sequence a block at a time (one query per TOKEN_BLOCK claims); unused
        # ones are only gaps in the sequence. Cleared after fork: two processes must never
        # propose the same token.
        with self._tokens_lock:  # not self._lock: _fast may take that one to connect
            if not self._tokens:
                rows = self._fast("reserve_tokens", {"n": TOKEN_BLOCK})
                self._tokens.extend(int(r.token) for r in rows)
            return self._tokens.popleft()

    def heartbeat(self, file_url: str, token: int) -> float | None:
        rows = self._fast("heartbeat", {"file_url": file_url, "token": token})
        return float(rows[0].lease_left) if rows else None

    def complete(
        self,
        file_url: str,
        token: int,
        stats: Stats | Mapping[str, Any] | None = None,
        *,
        processing_time_ms: int | None = None,
        details: Mapping[str, Any] | None = None,
        transaction: Any = None,
    ) -> Work | None:
        s = Stats.coerce(stats)
        params = {
            "file_url": file_url,
            "token": token,
            "total": s.total,
            "filtered": s.filtered,
            "persisted": s.persisted,
            "processing_time_ms": processing_time_ms,
            "details": json.dumps(details) if details is not None else None,
        }
        if transaction is not None:
            done = self.in_transaction(transaction.connection, "complete", params).scalar()
        else:
            done = self._fast("complete", params)[0].done
        if done is None:
            raise errors.LostClaim.of(file_url, token, "completion not applied")
        return Work(done[0], done[1], Status.PENDING) if done else None

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
        transaction: Any = None,
    ) -> float:
        s = stats or Stats()
        params = {
            "file_url": file_url,
            "token": token,
            "position": json.dumps(position),
            "version": version,
            "total": s.total,
            "filtered": s.filtered,
            "persisted": s.persisted,
            "progress_bytes": progress_bytes,
            "size_bytes": size_bytes,
        }
        if transaction is not None:
            left = self.in_transaction(transaction.connection, "commit_chunk", params).scalar()
        else:
            rows = self._fast("commit_chunk", params)
            left = rows[0].lease_left if rows else None
        if left is None:
            raise errors.LostClaim.of(file_url, token, "chunk not committed")
        return float(left)

    def restart(
        self, file_url: str, token: int, version: str | None, fingerprint: str | None = None
    ) -> int:
        rows = self._fast(
            "restart",
            {"file_url": file_url, "token": token, "version": version, "fingerprint": fingerprint},
        )
        if not rows:
            raise errors.LostClaim.of(file_url, token, "restart not applied")
        return int(rows[0].generation)

    def fail(
        self,
        file_url: str,
        token: int,
        error: BaseException | str,
        *,
        retryable: bool = True,
        retry_in: float | None = None,
    ) -> FailResult:
        error_class, message = error_text(error)
        rows = self._fast(
            "fail",
            {
                "file_url": file_url,
                "token": token,
                "error_class": error_class,
                "error_message": message,
                "retryable": retryable,
                "retry_in": retry_in,
            },
        )
        if not rows:
            raise errors.LostClaim.of(file_url, token, "failure not recorded")
        row = rows[0]
        status = Status(row.status)
        return FailResult(
            status,
            row.attempt,
            row.max_attempts,
            retry_in=float(row.retry_in) if row.retry_in is not None else None,
            follow_up=_follow_up(row),
        )

    def abandon(self, file_url: str, worker_id: str, task_id: str | None) -> Status | None:
        rows = self._fast(
            "abandon", {"file_url": file_url, "worker": worker_id, "task_id": task_id}
        )
        return Status(rows[0].status) if rows else None

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
        pairs = list(split_registrations(urls))
        if not pairs:
            return []
        rows = self._fast(
            "register",
            {
                "urls": [u for u, _ in pairs],
                "fingerprints": [f for _, f in pairs],
                "batch_id": batch_id,
                "file_type": file_type,
                "task_name": task_name,
                "max_attempts": max_attempts,
                "changes_only": changes_only,
            },
        )
        # Plain dict lookups: Enum calls cost a second per 100,000 rows a watch registers.
        return [
            Registration(
                r.file_url,
                _STATUSES[r.status],
                bool(r.needs_task),
                r.task_name,
                _CHANGES[r.change],
                bool(r.held),
            )
            for r in rows
        ]

    def requeue(
        self,
        file_url: str | None = None,
        *,
        batch_id: str | None = None,
        statuses: Sequence[Status] | None = None,
        force: bool = False,
    ) -> list[Work]:
        rows = self._fast(
            "requeue",
            {
                "file_url": file_url,
                "batch_id": batch_id,
                "statuses": [str(s) for s in requeue_statuses(statuses, force)],
                "force": force,
            },
        )
        return [Work(r.file_url, r.task_name, Status(r.status)) for r in rows]

    def reap(
        self,
        *,
        waiting_seconds: float | None = DEFAULT_WAITING_SECONDS,
        limit: int = 1000,
        overdue_seconds: float = DEFAULT_OVERDUE_SECONDS,
        gap_seconds: float = DEFAULT_GAP_SECONDS,
    ) -> list[Work]:
        waiting = None if waiting_seconds is None else float(waiting_seconds)
        rows = self._fast(
            "reap",
            {
                "waiting_seconds": waiting,
                "limit": limit,
                "overdue_seconds": overdue_seconds,
                "gap_seconds": float(gap_seconds),
            },
        )
        return [Work(r.file_url, r.task_name, Status(r.status)) for r in rows]


def _follow_up(row: Any) -> Work | None:
    """What a failed or dead ending asks to send once committed: the batch callback it created,
    or the next held file of its limited batch it released (SQL: callback_url, callback_task)."""
    if row.callback_url is None:
        return None
    return Work(row.callback_url, row.callback_task, Status.PENDING)
