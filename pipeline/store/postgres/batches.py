"""What `submit`, `cancel`, `pause`, `resume` and `status --batch` do to a batch row."""

from __future__ import annotations

from typing import Any

from pipeline.models import BatchSpec, BatchState, Status, Work
from pipeline.store.postgres.connection import Connections
from pipeline.views import Batch


class BatchRows(Connections):
    """`open_batch`, `cancel_batch`, `pause_batch`, `resume_batch` and `batch`."""

    def open_batch(self, spec: BatchSpec) -> BatchState:
        (row,) = self._fast(
            "batch_open",
            {
                "name": spec.name,
                "task_name": spec.task_name,
                "submitted_by": spec.submitted_by,
                "concurrency": spec.concurrency,
                "on_complete": spec.on_complete,
            },
        )
        return BatchState(row.state)

    def cancel_batch(self, name: str) -> int | None:
        rows = self._fast("batch_cancel", {"name": name})
        return int(rows[0].cancelled) if rows else None

    def pause_batch(self, name: str) -> BatchState | None:
        rows = self._fast("batch_pause", {"name": name})
        return BatchState(rows[0].state) if rows else None

    def resume_batch(self, name: str) -> list[Work] | None:
        rows = self._fast("batch_resume", {"name": name})
        if not rows:
            return None
        # The first row names the batch with no file (it was paused): not a file to send.
        return [Work(r.file_url, r.task_name, Status(r.status)) for r in rows if r.file_url]

    def batch(self, name: str) -> Batch | None:
        return read(self, name)

    def callback_summary(self, file_url: str) -> dict[str, Any] | None:
        rows = self._fast("callback_summary", {"file_url": file_url})
        return dict(rows[0].details) if rows and rows[0].details is not None else None


def read(store: Connections, name: str) -> Batch | None:
    """One batch, in one read (the `batch` query)."""
    rows = store._fast("batch", {"name": name})
    if not rows:
        return None
    r = rows[0]
    waiting = None if r.oldest_waiting is None else (r.db_now - r.oldest_waiting)
    return Batch(
        name=r.name,
        task_name=r.task_name,
        created_at=r.created_at,
        submitted_by=r.submitted_by,
        file_count=int(r.file_count),
        state=BatchState(r.state),
        concurrency=r.concurrency,
        on_complete=r.on_complete,
        callbacks=int(r.callbacks),
        counts={Status(s): int(n) for s, n in (r.counts or {}).items()},
        oldest_waiting_age=None if waiting is None else max(waiting.total_seconds(), 0.0),
        completed_last_minute=int(r.completed_last_minute),
        held=int(r.held or 0),
    )
