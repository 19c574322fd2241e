"""Submit: stream URLs, register them in batches, enqueue one task for each file that needs one."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pipeline import urls
from pipeline.models import Status
from pipeline.store import DEFAULT_MAX_ATTEMPTS, Store

DEFAULT_TASK = "pipeline.ingest"
# URLs per registration statement: one round trip per chunk, constant memory per chunk.
CHUNK = 1000
# Refused lines kept for the report; the rest are only counted (memory stays flat).
MAX_REFUSED_KEPT = 1000


@dataclasses.dataclass
class SubmitReport:
    """What a submit did, updated chunk by chunk."""

    seen: int = 0
    enqueued: int = 0
    completed_before: int = 0
    dead_before: int = 0
    in_flight_before: int = 0
    refused_count: int = 0
    refused: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)

    def refuse(self, line: int, text: str, reason: str) -> None:
        self.refused_count += 1
        if len(self.refused) < MAX_REFUSED_KEPT:
            self.refused.append((line, text[:200], reason))


Source = Iterator[tuple[int, str, str | None, str | None, str | None]]
"""(line, raw text, url, fingerprint, refusal reason) per input item."""


def from_lines(lines: Iterable[str], *, fingerprints: bool = True) -> Source:
    """Input lines (arguments, a file, stdin) as normalised URLs; local files fingerprinted."""
    buffered, copy = itertools.tee(lines)
    for (number, url, reason), raw in zip(urls.iter_normalized(buffered), copy, strict=True):
        text = raw.rstrip("\r\n")
        if url is None:
            yield number, text, None, None, reason
            continue
        # A stat is cheap locally; a HEAD per remote URL is not, so remote lists go without
        # (globs carry their fingerprints from the listing).
        fp = urls.fingerprint(url) if fingerprints and url.startswith("file:") else None
        yield number, text, url, fp, None


def from_glob(pattern: str) -> Source:
    """Files matching a glob on any fsspec filesystem, with fingerprints from the listing."""
    fs, path = urls.filesystem(pattern)
    found = fs.glob(path, detail=True)
    for number, (name, info) in enumerate(sorted(found.items()), start=1):
        if info.get("type") == "directory":
            continue
        raw = (
            name
            if pattern.startswith(("file:", "/")) or "://" not in pattern
            else fs.unstrip_protocol(name)
        )
        try:
            url = urls.normalize(raw)
        except Exception as error:  # a listed name that is not a usable URL
            yield number, raw, None, None, str(getattr(error, "data", {}).get("reason", error))
            continue
        yield number, raw, url, urls.fingerprint_from_info(info), None


def submit(
    store: Store,
    source: Source,
    send: Callable[[str, str], None],
    *,
    task_name: str = DEFAULT_TASK,
    batch_id: str | None = None,
    file_type: str = "unknown",
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    force: bool = False,
    chunk_size: int = CHUNK,
    progress: Callable[[SubmitReport], None] | None = None,
) -> SubmitReport:
    """Register and enqueue; `send(task_name, url)` enqueues one task."""
    report = SubmitReport()
    while True:
        chunk = list(itertools.islice(source, chunk_size))
        if not chunk:
            break
        pairs: list[tuple[str, str | None]] = []
        for line, raw, url, fp, reason in chunk:
            if url is None:
                report.refuse(line, raw, reason or "refused")
            else:
                pairs.append((url, fp))
        report.seen += len(pairs)
        registrations = store.register(
            pairs,
            batch_id=batch_id,
            file_type=file_type,
            task_name=task_name,
            max_attempts=max_attempts,
        )
        for reg in registrations:
            if reg.needs_task:
                send(reg.task_name or task_name, reg.file_url)
                report.enqueued += 1
            elif reg.status is Status.COMPLETED:
                if force:
                    for work in store.requeue(
                        reg.file_url, statuses=[Status.COMPLETED], force=True
                    ):
                        send(work.task_name or task_name, work.file_url)
                        report.enqueued += 1
                else:
                    report.completed_before += 1
            elif reg.status is Status.DEAD:
                report.dead_before += 1
            else:
                # Already pending or running: its task exists (the reaper re-enqueues a row
                # whose message was lost once it has waited long enough).
                report.in_flight_before += 1
        if progress:
            progress(report)
    return report


def celery_sender(app: Any) -> tuple[Callable[[str, str], None], Callable[[], None]]:
    """A send function reusing one broker connection, and the function that releases it."""
    connection = app.connection_for_write()
    # Connect now, with one retry: kombu connects lazily on the first publish and then
    # retries for ever, so a down broker would surface mid-submit, after rows were registered.
    connection.ensure_connection(max_retries=1)
    producer = app.amqp.Producer(connection)

    def send(task_name: str, url: str) -> None:
        app.send_task(task_name, args=[url], producer=producer)

    def close() -> None:
        producer.release() if hasattr(producer, "release") else None
        connection.release()

    return send, close
