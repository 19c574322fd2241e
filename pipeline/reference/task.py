"""The reference task `pipeline.ingest`: JSON Lines or CSV events into the `events` table."""

from __future__ import annotations

from typing import Any

from pipeline.models import Stats
from pipeline.reference import ingest
from pipeline.worker.decorator import checkpointed


@checkpointed(name="pipeline.ingest", file_type="events", dont_retry_on=(ingest.BadInput,))
def ingest_file(file_url: str, *, checkpoint: Any) -> Stats:
    """Read a file's records, write the valid ones to `events` with the checkpoint."""
    tally = ingest.Tally()
    with checkpoint.transaction() as output:
        # The old generation's events go first, in the same transaction: the COPY after it
        # cannot conflict with them, and a crash (or a bad line halfway) rolls back both.
        output.execute_many(ingest.DELETE_EVENTS_SQL, [{"file_url": file_url}])
        rows = ingest.copy_rows(file_url, ingest.read_records(file_url), tally)
        persisted = output.copy_rows(ingest.COPY_EVENTS_SQL, rows)
    if tally.examples:
        checkpoint.details.update(tally.details())
    return tally.stats(persisted)
