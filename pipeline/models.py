"""Value objects of a file's life (its row, claims, attempts, registration); the status enums.

What the operator's views read (status, a batch, the metrics) is in pipeline.views.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Mapping
from typing import Any


class Status(enum.StrEnum):
    """A checkpoint's state; the values match the database's check constraint."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    DEAD = "dead"
    #: a file of a cancelled batch, stopped where it got to; `requeue` brings it back
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (Status.COMPLETED, Status.DEAD)


class Reason(enum.StrEnum):
    """Why a claim was refused."""

    DONE = "done"
    BUSY = "busy"
    #: a failed file whose backoff is not over yet (`retry_in` says how long it still runs)
    NOT_DUE = "not_due"
    DEAD = "dead"
    #: its batch was cancelled: the file is `cancelled` until requeued
    CANCELLED = "cancelled"
    #: its batch is paused: held, no attempt spent; `resume` enqueues it again
    PAUSED = "paused"
    #: its batch has as many files running as its limit allows: held (no message, no attempt
    #: spent) until one of its files ends and releases it
    LIMITED = "limited"


class Outcome(enum.StrEnum):
    """How one attempt ended, as kept in the attempt history."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    LOST = "lost"
    #: stopped at a chunk because its batch was cancelled (no attempt spent)
    CANCELLED = "cancelled"


@dataclasses.dataclass(frozen=True, slots=True)
class Stats:
    """What a task reports about one file."""

    total: int = 0
    filtered: int = 0
    persisted: int = 0

    @classmethod
    def coerce(cls, value: Stats | Mapping[str, Any] | None) -> Stats:
        """Accept the dataclass, a dict with total/filtered/persisted, or None (all zero)."""
        if value is None:
            return cls()
        if isinstance(value, Stats):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"total", "filtered", "persisted"}
            if unknown:
                raise TypeError(f"unknown stats keys: {sorted(unknown)}")
            return cls(**{k: int(v) for k, v in value.items()})
        raise TypeError(f"stats must be a Stats or a dict, not {type(value).__name__}")

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """A granted claim: the caller may process the file until its lease runs out.

    `position`: where the last committed chunk of this generation got to (None: the start),
    read from the object's `version`, with the running `stats` committed with it.
    """

    file_url: str
    token: int
    attempt: int
    max_attempts: int
    lease_seconds: float
    generation: int
    position: Any = None
    version: str | None = None
    stats: Stats = dataclasses.field(default_factory=Stats)

    def __bool__(self) -> bool:
        return True


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """A refused claim; `reason` says why, with the stored stats or the time left on the lease."""

    file_url: str
    reason: Reason
    retry_in: float | None = None
    stats: Stats | None = None
    error: str | None = None

    def __bool__(self) -> bool:
        return False


ClaimResult = Claim | Refusal


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One execution of a file, kept after the row moves on."""

    generation: int
    attempt: int
    token: int
    worker: str | None
    started_at: dt.datetime
    ended_at: dt.datetime | None
    outcome: Outcome
    error_class: str | None
    error_message: str | None
    #: where the attempt started and ended (chunk positions; None: the beginning)
    start_position: Any = None
    end_position: Any = None
    #: the chunks it committed that moved the position on
    chunks: int = 0
    #: the OpenTelemetry trace the attempt ran in (32 hex digits), when tracing was on
    trace_id: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    """A file's checkpoint row."""

    file_url: str
    file_type: str
    status: Status
    attempt: int
    max_attempts: int
    generation: int
    token: int | None
    records_total: int
    records_filtered: int
    records_persisted: int
    processing_time_ms: int
    error_message: str | None
    processed_by: str | None
    task_name: str | None
    task_id: str | None
    batch_id: str | None
    fingerprint: str | None
    lease_expires_at: dt.datetime | None
    started_at: dt.datetime | None
    completed_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    #: when a failed row's next attempt may start (its backoff, on the database clock)
    retry_at: dt.datetime | None = None
    attempts: tuple[Attempt, ...] = ()
    #: the last committed chunk's position and the object version it was read from
    position: Any = None
    position_version: str | None = None
    #: bytes of the raw stream done, and the object's size, as the task reported them
    progress_bytes: int | None = None
    size_bytes: int | None = None
    progress_at: dt.datetime | None = None
    #: attempts of this generation that ended without progress (the cap counts these)
    attempts_spent: int = 0

    @property
    def retry_count(self) -> int:
        return max(self.attempt - 1, 0)

    @property
    def stats(self) -> Stats:
        return Stats(self.records_total, self.records_filtered, self.records_persisted)


@dataclasses.dataclass(frozen=True, slots=True)
class FailResult:
    """What `fail` did: the row's new status, and whether a retry should be scheduled.

    `retry_in`: seconds until the next attempt may start, measured by the store after it
    wrote the row (so a retry message sent with that countdown is never early).
    `follow_up`: the batch callback this dead ending created (it made its batch terminal), or
    the next held file of its limited batch it released, to send; it was committed with the
    failure.
    """

    status: Status
    attempt: int
    max_attempts: int
    retry_in: float | None = None
    follow_up: Work | None = None

    @property
    def will_retry(self) -> bool:
        return self.status is Status.FAILED


class Change(enum.StrEnum):
    """What registering a URL found: a new row, a new generation of changed content, or
    neither (a known row, left as it was)."""

    NEW = "new"
    CHANGED = "changed"
    UNCHANGED = "unchanged"


@dataclasses.dataclass(frozen=True, slots=True)
class Registration:
    """The outcome of registering one URL at submit."""

    file_url: str
    status: Status
    needs_task: bool
    task_name: str | None
    change: Change = Change.UNCHANGED
    #: pending without a message: its batch's limit holds it until one of its files ends
    held: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Work:
    """A file whose task must be (re-)enqueued, as returned by `reap` and `requeue`."""

    file_url: str
    task_name: str | None
    status: Status


class BatchState(enum.StrEnum):
    """A batch's state; the values match the database's check constraint."""

    OPEN = "open"
    DONE = "done"
    CANCELLED = "cancelled"
    PAUSED = "paused"


@dataclasses.dataclass(frozen=True, slots=True)
class BatchSpec:
    """What a submit says about its batch besides its files."""

    name: str
    task_name: str | None = None
    submitted_by: str | None = None
    #: at most this many of its files processing at once (None: no limit)
    concurrency: int | None = None
    #: the Celery task run once every file is terminal (None: none)
    on_complete: str | None = None


@dataclasses.dataclass(frozen=True)
class Pruned:
    """What `pipeline prune` deleted."""

    #: ended attempts past the retention (each file's latest kept)
    attempts: int
    #: completed files forgotten (asked for only), their history with them
    files: int
    #: stopped at its `max_batches` with a full last batch: more may be left
    more: bool = False
