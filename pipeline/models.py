"""Value objects shared by the stores, the Celery glue, the producer and the CLI."""

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
    #: its batch has as many files running as its limit allows: not now (`retry_in`)
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
    """

    status: Status
    attempt: int
    max_attempts: int
    retry_in: float | None = None

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


@dataclasses.dataclass(frozen=True, slots=True)
class Work:
    """A file whose task must be (re-)enqueued, as returned by `reap` and `requeue`."""

    file_url: str
    task_name: str | None
    status: Status


@dataclasses.dataclass(frozen=True, slots=True)
class DeadFile:
    """A dead file and why."""

    file_url: str
    error: str | None
    when: dt.datetime
    attempts: int


@dataclasses.dataclass(frozen=True, slots=True)
class DatabaseTrouble:
    """A spell of database trouble a worker saw (disk full, too many connections,
    unreachable, configuration, ...), recorded once the database answered it again."""

    cause: str
    message: str
    seen_by: str | None
    first_at: dt.datetime
    last_at: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class DatabaseGap:
    """The last time the database answered nobody of the fleet for longer than the gap rule's
    threshold, and how many leases were given the gap back."""

    started_at: dt.datetime
    ended_at: dt.datetime
    leases_extended: int

    @property
    def seconds(self) -> float:
        return (self.ended_at - self.started_at).total_seconds()


@dataclasses.dataclass(frozen=True, slots=True)
class RunningFile:
    """A file being processed, and how far it got (from its committed chunks)."""

    file_url: str
    attempt: int
    records: int
    #: bytes of the raw stream done, and the object's size, when the task reports them
    progress_bytes: int | None
    size_bytes: int | None
    #: seconds since this generation's first attempt started (for the rate)
    seconds: float

    @property
    def percent(self) -> float | None:
        if self.progress_bytes is None or not self.size_bytes:
            return None
        return min(100.0, 100.0 * self.progress_bytes / self.size_bytes)

    @property
    def rate(self) -> float | None:
        """Records per second over the generation so far."""
        return self.records / self.seconds if self.seconds > 0 and self.records else None

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far, where the size is known."""
        if self.progress_bytes is None or not self.size_bytes or not self.progress_bytes:
            return None
        per_byte = self.seconds / self.progress_bytes
        return max(0.0, (self.size_bytes - self.progress_bytes) * per_byte)


@dataclasses.dataclass(frozen=True, slots=True)
class Overview:
    """What `pipeline status` shows: counts, throughput, leases and the latest dead files."""

    counts: Mapping[str | None, Mapping[Status, int]]
    completed_last_minute: int
    oldest_live_lease_age: float | None
    expired_leases: int
    dead: tuple[DeadFile, ...]
    records: Stats | None = None
    # One batch's running time so far: its first claim to its last file's end (None when
    # nothing has both yet, or for all batches).
    batch_seconds: float | None = None
    #: files being processed, oldest first, with their progress
    running: tuple[RunningFile, ...] = ()
    #: records committed so far by files still running (their chunks)
    records_in_flight: int = 0
    #: the batch asked for (`status --batch`), when it has a row
    batch: Batch | None = None
    #: database trouble the workers saw in the last day, the latest first (one per cause)
    database_trouble: tuple[DatabaseTrouble, ...] = ()
    #: the last gap the database answered nobody (the gap rule), if any
    database_gap: DatabaseGap | None = None

    def totals(self) -> dict[Status, int]:
        result = dict.fromkeys(Status, 0)
        for per_status in self.counts.values():
            for status, n in per_status.items():
                result[status] += n
        return result


@dataclasses.dataclass(frozen=True, slots=True)
class Histogram:
    """Durations over a window: how many were at most each bound (cumulative, as Prometheus
    buckets are), how many in all and their sum in seconds."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    count: int
    total_seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class BatchProgress:
    """One batch as the metrics show it: its files by status, and its pace in the window."""

    batch_id: str
    counts: Mapping[Status, int]
    #: files that ended (completed or dead) in the window, and when the first of them did
    finished_in_window: int
    #: files per second over the window, or since its first finish when that is more recent
    #: (at least a minute): None when nothing finished in the window
    rate: float | None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def remaining(self) -> int:
        return sum(n for status, n in self.counts.items() if not status.terminal)

    @property
    def eta_seconds(self) -> float | None:
        """Seconds until every file is terminal at the current rate (None: no rate yet)."""
        if self.remaining == 0:
            return 0.0
        return None if not self.rate else self.remaining / self.rate


@dataclasses.dataclass(frozen=True, slots=True)
class Operations:
    """What the Prometheus exporter serves, read from the database in one refresh.

    Ages are in seconds on the database's clock (None: nothing of that kind); the `window_*`
    figures cover the last `window_seconds`.
    """

    window_seconds: float
    counts: Mapping[Status, int]
    oldest_pending_age: float | None
    oldest_failed_age: float | None
    oldest_live_lease_age: float | None
    expired_leases: int
    oldest_expired_lease_age: float | None
    completed_last_minute: int
    window_completed: int
    window_dead: int
    window_records_committed: int
    #: records committed by the chunks of the files still running
    records_in_flight: int
    #: attempts that ended in the window by (outcome, error class; "" for none)
    window_attempts: Mapping[tuple[str, str], int]
    window_run_seconds: Mapping[str, Histogram]
    window_pickup_seconds: Histogram
    batches: tuple[BatchProgress, ...]
    active_batches: int
    workers_live: int
    #: seconds since the latest heartbeat of any worker (None: no worker ever seen)
    worker_heartbeat_age: float | None
    #: when the workers last saw each cause of database trouble (Unix time), last day
    database_trouble_at: Mapping[str, float] = dataclasses.field(default_factory=dict)


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


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """One batch as `status --batch` shows it: its row, its files by status and its pace."""

    name: str
    task_name: str | None
    created_at: dt.datetime
    submitted_by: str | None
    file_count: int
    state: BatchState
    concurrency: int | None
    on_complete: str | None
    #: completion callbacks created so far (`batch:NAME#1`, `#2` when it grew after the first)
    callbacks: int
    counts: Mapping[Status, int]
    #: seconds the oldest pending file has waited since its submit (None: none pending)
    oldest_waiting_age: float | None
    completed_last_minute: int

    @property
    def remaining(self) -> int:
        """Files not yet terminal, the cancelled ones included (a requeue brings them back)."""
        return sum(n for status, n in self.counts.items() if not status.terminal)

    @property
    def rate(self) -> float | None:
        """Files completed per second over the last minute (None: none)."""
        return self.completed_last_minute / 60.0 if self.completed_last_minute else None

    @property
    def eta_seconds(self) -> float | None:
        """Seconds until every file is terminal at the last minute's rate (None: no rate)."""
        if self.remaining == 0:
            return 0.0
        rate = self.rate
        return None if rate is None else self.remaining / rate


@dataclasses.dataclass(frozen=True)
class Pruned:
    """What `pipeline prune` deleted."""

    #: ended attempts past the retention (each file's latest kept)
    attempts: int
    #: completed files forgotten (asked for only), their history with them
    files: int
    #: stopped at its `max_batches` with a full last batch: more may be left
    more: bool = False
