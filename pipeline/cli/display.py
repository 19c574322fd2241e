"""What `status` shows: the table of a batch or all batches, its lines, and its JSON.

The live views while a command works (a submit's count, the bar of `--wait`) are in
pipeline/cli/live.py.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline import masking
from pipeline.models import Status
from pipeline.views import Batch, Overview

out = Console()


def unfinished(overview: Overview) -> int:
    t = overview.totals()
    return t[Status.PENDING] + t[Status.PROCESSING] + t[Status.FAILED]


def records_so_far(overview: Overview) -> int:
    """Records read: the completed files' and the running files' committed chunks'."""
    done = overview.records.total if overview.records is not None else 0
    return done + overview.records_in_flight


def overview_json(overview: Overview) -> dict[str, Any]:
    return {
        "counts": {str(s): n for s, n in overview.totals().items()},
        "batches": {
            (batch or ""): {str(s): n for s, n in counts.items()}
            for batch, counts in overview.counts.items()
        },
        "completed_last_minute": overview.completed_last_minute,
        "oldest_live_lease_age_seconds": overview.oldest_live_lease_age,
        "expired_leases": overview.expired_leases,
        "dead": [
            {
                # Rows registered before credentials in file URLs were refused may hold some.
                "file_url": masking.scrub(d.file_url),
                "error": masking.scrub(d.error) if d.error else d.error,
                "at": d.when.isoformat(),
                "attempts": d.attempts,
            }
            for d in overview.dead
        ],
        "database_trouble": [
            {
                "cause": t.cause,
                "message": masking.scrub(t.message),
                "seen_by": t.seen_by,
                "first_at": t.first_at.isoformat(),
                "last_at": t.last_at.isoformat(),
            }
            for t in overview.database_trouble
        ],
        "database_gap": None
        if overview.database_gap is None
        else {
            "started_at": overview.database_gap.started_at.isoformat(),
            "ended_at": overview.database_gap.ended_at.isoformat(),
            "seconds": round(overview.database_gap.seconds, 1),
            "leases_extended": overview.database_gap.leases_extended,
        },
        "records": overview.records.as_dict() if overview.records else None,
        "records_in_flight": overview.records_in_flight,
        "batch": None if overview.batch is None else batch_json(overview.batch),
        "running": [
            {
                "file_url": masking.scrub(r.file_url),
                "attempt": r.attempt,
                "records": r.records,
                "bytes": r.progress_bytes,
                "size": r.size_bytes,
                "percent": None if r.percent is None else round(r.percent, 1),
                "records_per_second": None if r.rate is None else round(r.rate, 1),
                "eta_seconds": None if r.eta is None else round(r.eta, 1),
            }
            for r in overview.running
        ],
    }


def batch_json(batch: Batch) -> dict[str, Any]:
    """A batch's row, counts, oldest waiting file and pace (`status --batch --json`)."""
    return {
        "name": batch.name,
        "task": batch.task_name,
        "created": batch.created_at.isoformat(),
        "submitted_by": batch.submitted_by,
        "file_count": batch.file_count,
        "state": str(batch.state),
        "concurrency": batch.concurrency,
        "held": batch.held,
        "on_complete": batch.on_complete,
        "callbacks": batch.callbacks,
        "counts": {str(s): batch.counts.get(s, 0) for s in Status},
        "oldest_waiting_seconds": batch.oldest_waiting_age,
        "files_per_second": batch.rate,
        "eta_seconds": batch.eta_seconds,
    }


def batch_line(batch: Batch) -> str:
    """One line about a batch's row: state, who, limit, callback, oldest waiting, ETA."""
    parts = [f"state {batch.state}", f"{batch.file_count} files", f"task {batch.task_name}"]
    if batch.submitted_by:
        parts.append(f"by {batch.submitted_by}")
    if batch.concurrency:
        parts.append(f"at most {batch.concurrency} running ({batch.held} held)")
    if batch.on_complete:
        parts.append(f"on complete {batch.on_complete} (fired {batch.callbacks})")
    if batch.oldest_waiting_age is not None:
        parts.append(f"oldest waiting {batch.oldest_waiting_age:.0f}s")
    if batch.eta_seconds:
        parts.append(f"ETA {batch.eta_seconds:.0f}s")
    return escape(", ".join(parts))


def print_overview(overview: Overview, batch_id: str | None = None) -> None:
    table = Table(title=f"batch {escape(batch_id)}" if batch_id else "all batches")
    table.add_column("batch")
    for status in Status:
        table.add_column(str(status), justify="right")
    for batch, counts in sorted(overview.counts.items(), key=lambda kv: kv[0] or ""):
        table.add_row(escape(batch or "(none)"), *[str(counts.get(s, 0)) for s in Status])
    if len(overview.counts) > 1:
        t = overview.totals()
        table.add_row("[bold]total", *[f"[bold]{t[s]}" for s in Status])
    out.print(table)
    if overview.batch is not None:
        out.print(batch_line(overview.batch))
    out.print(throughput_line(overview, batch_id))
    if overview.records is not None:
        r = overview.records
        out.print(f"records: {r.total} read, {r.filtered} filtered, {r.persisted} persisted")
    for line in database_lines(overview):
        out.print(escape(line))
    if overview.running:
        out.print(running_table(overview))
    if overview.dead:
        dead = Table(title="latest dead files")
        # The end of a file's URL tells files apart: cut long ones from the left.
        width = max(24, out.width // 2 - 8)
        dead.add_column("file", no_wrap=True, max_width=width)
        dead.add_column("attempts", justify="right")
        dead.add_column("error")
        for d in overview.dead:
            dead.add_row(
                escape(shorten_left(masking.scrub(d.file_url), width)),
                str(d.attempts),
                escape(masking.scrub((d.error or "")[:200])),
            )
        out.print(dead)


def database_lines(overview: Overview) -> list[str]:
    """When the database last refused or failed the workers and why, and the last gap."""
    lines = []
    for t in overview.database_trouble:
        spell = (t.last_at - t.first_at).total_seconds()
        lines.append(
            f"database trouble: {t.cause}, last at {t.last_at:%Y-%m-%d %H:%M:%S %Z}"
            f" (for {spell:.0f}s, seen by {t.seen_by or '?'}): {masking.scrub(t.message)[:200]}"
        )
    gap = overview.database_gap
    if gap is not None:
        lines.append(
            f"database gap: it answered no worker for {gap.seconds:.1f}s until "
            f"{gap.ended_at:%Y-%m-%d %H:%M:%S %Z}; {gap.leases_extended} leases given the gap "
            "back (no attempt spent)"
        )
    return lines


def running_table(overview: Overview) -> Table:
    """The files being processed, with how far their committed chunks got."""
    table = Table(title="running (committed so far)")
    width = max(24, out.width // 2 - 8)
    table.add_column("file", no_wrap=True, max_width=width)
    for name in ("attempt", "records", "bytes", "done", "records/s", "eta"):
        table.add_column(name, justify="right")
    for r in overview.running:
        size = (
            f"{_bytes(r.progress_bytes)} of {_bytes(r.size_bytes)}"
            if r.size_bytes
            else (_bytes(r.progress_bytes))
        )
        table.add_row(
            escape(shorten_left(masking.scrub(r.file_url), width)),
            str(r.attempt),
            f"{r.records:,}",
            size,
            "-" if r.percent is None else f"{r.percent:.0f}%",
            "-" if r.rate is None else f"{r.rate:,.0f}",
            "-" if r.eta is None else _clock(r.eta),
        )
    return table


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - the loop returns first


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def shorten_left(text: str, width: int) -> str:
    """`text` cut to `width` characters from the left, at a `/` where one is near: `…/b.jsonl`."""
    if len(text) <= width:
        return text
    tail = text[-(width - 1) :]
    cut = tail.find("/")
    # At a path separator when that keeps most of the room (and the whole file name).
    if 0 <= cut < width // 2:
        tail = tail[cut:]
    return "…" + tail


def throughput_line(overview: Overview, batch_id: str | None) -> str:
    """A finished batch's own rate over its running time; for live work, the last minute."""
    t = overview.totals()
    finished = t[Status.COMPLETED] + t[Status.DEAD]
    seconds = overview.batch_seconds
    if batch_id is not None and not unfinished(overview) and finished and seconds:
        records = overview.records.total if overview.records is not None else 0
        return (
            f"throughput: {finished} files in {seconds:.1f}s "
            f"({finished / seconds:.1f} files/s, {records / seconds:,.0f} records/s)"
        )
    age = overview.oldest_live_lease_age
    return (
        f"throughput: {overview.completed_last_minute} files completed in the last minute "
        f"({overview.completed_last_minute / 60:.1f}/s); oldest live claim: "
        f"{'none' if age is None else f'{age:.1f}s'}; expired leases waiting for the reaper: "
        f"{overview.expired_leases}"
    )
