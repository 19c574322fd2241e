"""`pipeline status --file URL`: one file's row and its attempts, each with its trace id."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from pipeline import masking
from pipeline.cli.display import out
from pipeline.models import Checkpoint


def file_json(row: Checkpoint) -> dict[str, Any]:
    return {
        # Rows registered before credentials in file URLs were refused may hold some.
        "file_url": masking.scrub(row.file_url),
        "status": str(row.status),
        "attempt": row.attempt,
        "max_attempts": row.max_attempts,
        "generation": row.generation,
        "batch": row.batch_id,
        "task": row.task_name,
        "error": masking.scrub(row.error_message) if row.error_message else None,
        "records": row.stats.as_dict(),
        "retry_at": row.retry_at.isoformat() if row.retry_at else None,
        "attempts": [
            {
                "generation": a.generation,
                "attempt": a.attempt,
                "worker": a.worker,
                "started_at": a.started_at.isoformat(),
                "ended_at": a.ended_at.isoformat() if a.ended_at else None,
                "outcome": str(a.outcome),
                "error_class": a.error_class,
                "error": masking.scrub(a.error_message) if a.error_message else None,
                "trace_id": a.trace_id,
            }
            for a in row.attempts
        ],
    }


def print_file(row: Checkpoint) -> None:
    out.print(
        f"[bold]{escape(masking.scrub(row.file_url))}[/bold]: {row.status}, attempt "
        f"{row.attempt} of {row.max_attempts}, generation {row.generation}, batch "
        f"{escape(row.batch_id or '(none)')}, task {escape(row.task_name or '?')}"
    )
    if row.error_message:
        out.print(f"error: {escape(masking.scrub(row.error_message)[:500])}")
    if row.retry_at:
        out.print(f"next attempt no earlier than {row.retry_at:%Y-%m-%d %H:%M:%S %Z}")
    table = Table(title="attempts")
    for column in ("gen", "attempt", "worker", "started", "took", "outcome", "error", "trace id"):
        table.add_column(column, no_wrap=column == "trace id")
    for a in row.attempts:
        took = f"{(a.ended_at - a.started_at).total_seconds():.2f}s" if a.ended_at else "running"
        error = f"{a.error_class}: {a.error_message}" if a.error_class else ""
        table.add_row(
            str(a.generation),
            str(a.attempt),
            escape(a.worker or ""),
            f"{a.started_at:%H:%M:%S}",
            took,
            str(a.outcome),
            escape(masking.scrub(error)[:120]),
            a.trace_id or "-",
        )
    out.print(table)
