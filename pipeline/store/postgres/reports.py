"""What `status`, `submit --wait` and the metrics read: one row, counts, the overview."""

from __future__ import annotations

from pipeline.models import Attempt, Checkpoint, Outcome, Stats, Status
from pipeline.store.postgres import batches
from pipeline.store.postgres.connection import Connections
from pipeline.views import DatabaseGap, DatabaseTrouble, DeadFile, Overview, RunningFile


class Reports(Connections):
    """`get`, `summary` and `overview`."""

    def get(self, file_url: str, *, with_attempts: bool = False) -> Checkpoint | None:
        rows = self._fast("get", {"file_url": file_url})
        if not rows:
            return None
        data = rows[0]._asdict()
        data["status"] = Status(data["status"])
        attempts: tuple[Attempt, ...] = ()
        if with_attempts:
            attempts = tuple(
                Attempt(**{**r._asdict(), "outcome": Outcome(r.outcome)})
                for r in self._fast("attempts", {"file_url": file_url})
            )
        return Checkpoint(**data, attempts=attempts)

    def summary(self, batch_id: str | None = None) -> dict[str | None, dict[Status, int]]:
        result: dict[str | None, dict[Status, int]] = {}
        # One batch: its counters (a read of its slots); all: a pass over the status index.
        if batch_id is None:
            rows = self._fast("summary", {"batch_id": None})
        else:
            rows = self._fast("batch_summary", {"batch_id": batch_id})
        for r in rows:
            result.setdefault(r.batch_id, {})[Status(r.status)] = int(r.n)
        return result

    def overview(
        self, batch_id: str | None = None, *, dead_limit: int = 10, running_limit: int = 10
    ) -> Overview:
        (act,) = self._fast("activity", {"batch_id": batch_id})
        dead = tuple(
            DeadFile(r.file_url, r.error_message, r.updated_at, r.attempt)
            for r in self._fast("dead", {"batch_id": batch_id, "limit": dead_limit})
        )
        records = None
        seconds = None
        batch = None
        if batch_id is not None:
            batch = batches.read(self, batch_id)
            (t,) = self._fast("totals", {"batch_id": batch_id})
            records = Stats(int(t.total), int(t.filtered), int(t.persisted))
            seconds = None if t.seconds is None else float(t.seconds)
        age = (
            (act.db_now - act.oldest_live_start).total_seconds()
            if act.oldest_live_start is not None
            else None
        )
        running = self._fast("running", {"batch_id": batch_id, "limit": running_limit})
        return Overview(
            running=tuple(
                RunningFile(
                    r.file_url,
                    r.attempt,
                    int(r.records_total),
                    r.progress_bytes,
                    r.size_bytes,
                    float(r.seconds or 0.0),
                )
                for r in running
            ),
            records_in_flight=int(running[0].in_flight) if running else 0,
            counts=self.summary(batch_id),
            completed_last_minute=int(act.completed_last_minute),
            oldest_live_lease_age=age,
            expired_leases=int(act.expired_leases),
            dead=dead,
            records=records,
            batch_seconds=seconds,
            batch=batch,
            database_trouble=self.database_trouble(),
            database_gap=self.database_gap(),
        )

    def database_trouble(self) -> tuple[DatabaseTrouble, ...]:
        """The database trouble the workers saw in the last day, one per cause, latest first."""
        return tuple(
            DatabaseTrouble(r.cause, r.message, r.seen_by, r.first_at, r.last_at)
            for r in self._fast("database_trouble", {})
        )

    def database_gap(self) -> DatabaseGap | None:
        """The last gap the database answered nobody of the fleet (the gap rule)."""
        rows = self._fast("database_gap", {})
        if not rows:
            return None
        r = rows[0]
        return DatabaseGap(r.gap_started_at, r.gap_ended_at, int(r.leases_extended))
