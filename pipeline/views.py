"""Value objects of what the operator sees: the status overview, a batch, the metrics' figures.

Read by the store's reports (`pipeline status`, `status --batch`) and the Prometheus exporter;
the rows and claims they are made from are in pipeline.models.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping

from pipeline.models import BatchState, Stats, Status


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
    #: pending files held by the batch's limit (no message yet; sent as its files end)
    held: int = 0

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
