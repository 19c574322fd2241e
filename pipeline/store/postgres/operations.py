"""What the metrics exporter reads (`operations`), and the two small writes that feed it and
the traces: a worker's heartbeat, and the trace an attempt runs in."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from pipeline.models import Status
from pipeline.store.postgres.connection import Connections
from pipeline.views import BatchProgress, Histogram, Operations

# Durations (seconds) a file's wait and run are bucketed by: from a no-op task to an hour.
DURATION_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
# A batch's pace is measured over at least this long: one file finished a second ago is not a
# rate of one a second.
MIN_RATE_SPAN = 60.0


def _age(now: dt.datetime, then: dt.datetime | None) -> float | None:
    return None if then is None else max((now - then).total_seconds(), 0.0)


def histogram(rows: Iterable[Any], bounds: Sequence[float] = DURATION_BOUNDS) -> Histogram:
    """Prometheus buckets from rows of (bucket, n, seconds), bucket as width_bucket numbers it
    (i: at least bounds[i - 1] and below bounds[i]; 0: below bounds[0])."""
    per_bucket = [0] * (len(bounds) + 1)
    total = 0.0
    for r in rows:
        per_bucket[int(r.bucket)] += int(r.n)
        total += float(r.seconds or 0.0)
    cumulative, running = [], 0
    for n in per_bucket[:-1]:
        running += n
        cumulative.append(running)
    return Histogram(tuple(bounds), tuple(cumulative), running + per_bucket[-1], total)


class OperationsReads(Connections):
    """`operations`, `worker_seen`, `worker_stopped` and `record_trace`."""

    def operations(self, *, window_seconds: float = 900.0, max_batches: int = 20) -> Operations:
        """One snapshot for the exporter: four indexed reads, none over the whole history."""
        params = {"window": float(window_seconds), "bounds": list(DURATION_BOUNDS)}
        (s,) = self._fast("ops_state", {"window": float(window_seconds)})
        now = s.db_now
        counts: dict[Status, int] = dict.fromkeys(Status, 0)
        per_batch: dict[str, dict[Status, int]] = {}
        pace: dict[str, tuple[int, dt.datetime | None]] = {}
        active = 0
        for r in self._fast("ops_batches", {"window": float(window_seconds), "limit": max_batches}):
            if r.batch_id is None:
                counts[Status(r.status)] = int(r.n)
                active = int(r.active)
            else:
                per_batch.setdefault(r.batch_id, dict.fromkeys(Status, 0))[Status(r.status)] = int(
                    r.n
                )
                pace[r.batch_id] = (int(r.finished), r.first_finished)
        attempts: dict[tuple[str, str], int] = {}
        run_rows: dict[str, list[Any]] = {}
        for r in self._fast("ops_attempts", params):
            key = (r.outcome, r.error_class)
            attempts[key] = attempts.get(key, 0) + int(r.n)
            run_rows.setdefault(r.outcome, []).append(r)
        return Operations(
            window_seconds=float(window_seconds),
            counts=counts,
            oldest_pending_age=_age(now, s.oldest_pending),
            oldest_failed_age=_age(now, s.oldest_failed),
            oldest_live_lease_age=_age(now, s.oldest_live_start),
            expired_leases=int(s.expired_leases),
            oldest_expired_lease_age=_age(now, s.oldest_expiry),
            completed_last_minute=int(s.completed_last_minute),
            window_completed=int(s.window_completed),
            window_dead=int(s.window_dead),
            window_records_committed=int(s.window_records),
            records_in_flight=int(s.records_in_flight),
            database_trouble_at={
                r.cause: r.last_at.timestamp() for r in self._fast("database_trouble", {})
            },
            window_attempts=attempts,
            window_run_seconds={k: histogram(v) for k, v in run_rows.items()},
            window_pickup_seconds=histogram(self._fast("ops_pickup", params)),
            batches=tuple(
                BatchProgress(
                    batch_id=batch,
                    counts=per_batch[batch],
                    finished_in_window=pace[batch][0],
                    rate=_rate(now, *pace[batch], window_seconds),
                )
                for batch in per_batch
            ),
            active_batches=active,
            workers_live=int(s.workers_live),
            worker_heartbeat_age=_age(now, s.last_heartbeat),
        )

    def worker_seen(self, worker: str, pid: int, interval_seconds: float) -> None:
        """`worker` (a worker's main process) is alive; it reports every `interval_seconds`."""
        self._fast("worker_seen", {"worker": worker, "pid": pid, "interval": interval_seconds})
        # The fleet reached the database: a gap of more than two heartbeats is made good to
        # the leases live when it began (the gap rule; the sweep applies it as well).
        self._fast("contact", {"gap_seconds": 2.0 * interval_seconds})

    def record_trouble(
        self,
        cause: str,
        message: str,
        seen_by: str | None,
        first_at: dt.datetime,
        last_at: dt.datetime,
    ) -> None:
        """A spell of database trouble a worker saw, once the database answers it again."""
        self._fast(
            "record_trouble",
            {
                "cause": cause,
                "message": message[:500],
                "seen_by": seen_by,
                "first_at": first_at,
                "last_at": last_at,
            },
        )

    def worker_stopped(self, worker: str, pid: int) -> None:
        self._fast("worker_stopped", {"worker": worker, "pid": pid})

    def record_trace(self, file_url: str, token: int, trace_id: str) -> None:
        """Keep the trace of the attempt under `token` on its row (nothing if no longer held)."""
        self._fast("record_trace", {"file_url": file_url, "token": token, "trace_id": trace_id})


def _rate(
    now: dt.datetime, finished: int, first: dt.datetime | None, window_seconds: float
) -> float | None:
    if not finished or first is None:
        return None
    span = min(max((now - first).total_seconds(), MIN_RATE_SPAN), window_seconds)
    return finished / span
