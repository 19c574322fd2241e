"""The reference task `pipeline.ingest`: JSON Lines or CSV events into the `events` table, in
chunks that commit with the position they reached, so a crash costs one chunk."""

from __future__ import annotations

from typing import Any

from pipeline.models import Stats
from pipeline.reference import chunks, formats, ingest
from pipeline.sources import resumable, textfile
from pipeline.worker.decorator import checkpointed


@checkpointed(name="pipeline.ingest", file_type="events", dont_retry_on=(ingest.BadInput,))
def ingest_file(file_url: str, *, checkpoint: Any) -> Stats:
    """Read a file's records from where the last committed chunk ended, and write the valid
    ones to `events`, each chunk with its position."""
    kind, compression = formats.file_format(file_url)
    committed = chunks.Position.load(checkpoint.position)
    with resumable.open_at(
        file_url, compression, chunks.start_of(committed), checkpoint.version
    ) as opened:
        # The position is used only on the bytes it was read from: another version of the
        # object starts a new generation at the beginning.
        if checkpoint.resume(opened.version, fingerprint=opened.fingerprint) is None:
            committed = None
        start = opened.start  # where the stream is: the position, or the beginning
        tally = ingest.Tally.resumed(checkpoint.stats)
        persisted = checkpoint.stats.persisted
        blocks = textfile.line_blocks(file_url, opened.stream, line=start.line, offset=start.offset)
        items = formats.records(
            kind, blocks, line=start.line, header=committed.header if committed else None
        )
        for piece in chunks.pieces(items, start):
            with checkpoint.chunk() as chunk:
                if committed is None:
                    # A generation's first chunk: the file's old events go first, in the same
                    # transaction, so the COPY cannot conflict with them.
                    chunk.execute_many(ingest.DELETE_EVENTS_SQL, [{"file_url": file_url}])
                rows = ingest.copy_rows(file_url, piece, tally)
                persisted += chunk.copy_rows(ingest.COPY_EVENTS_SQL, rows)
                end = chunks.Position.of(piece.end) if piece.end else committed
                chunk.position = (end or chunks.Position(0, 0)).dump()
                chunk.stats = tally.stats(persisted)
                chunk.progress_bytes = opened.raw_offset()
                chunk.size_bytes = opened.size
            committed = end or chunks.Position(0, 0)
    if tally.examples:
        checkpoint.details.update(tally.details())
    return tally.stats(persisted)
