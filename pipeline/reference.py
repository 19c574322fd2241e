"""The reference task `pipeline.ingest`: JSON Lines or CSV events into the `events` table."""

from __future__ import annotations

from typing import Any

from pipeline import ingest, sqlstore
from pipeline.decorator import checkpointed
from pipeline.models import Stats

# Rows per INSERT round trip: large enough to amortise it, small enough to keep memory flat.
_BATCH = 500


@checkpointed(name="pipeline.ingest", file_type="events", dont_retry_on=(ingest.BadInput,))
def ingest_file(file_url: str, *, checkpoint: Any) -> Stats:
    """Read a file's records, write the valid ones to `events` with the checkpoint."""
    tally = ingest.Tally()
    persisted = 0
    pending: list[dict[str, Any]] = []
    with checkpoint.transaction() as conn:
        sqlstore.execute_many(conn, ingest.DELETE_EVENTS_SQL, [{"file_url": file_url}])
        for record in ingest.read_records(file_url):
            tally.add(record)
            if record.ok:
                pending.append(ingest.insert_params(file_url, record))
                if len(pending) >= _BATCH:
                    persisted += sqlstore.execute_many(conn, ingest.INSERT_EVENT_SQL, pending)
                    pending.clear()
        persisted += sqlstore.execute_many(conn, ingest.INSERT_EVENT_SQL, pending)
    if tally.examples:
        checkpoint.details.update(tally.details())
    return tally.stats(persisted)
