"""Watch: list a pattern again and again; register what is new or changed, enqueue only that.

The set of files already seen is the checkpoint table itself: a scan registers every listed
URL with its fingerprint (one statement per 1,000), and only the rows that statement created
(`new`) or moved to a new generation (`changed`) get a task. A restarted watch therefore
enqueues nothing already known, and two watches of one prefix never both enqueue a file: the
row is created, or regenerated, by exactly one of their statements.

A pending row whose message was lost (a watch killed between registering and sending) is
not sent again by the next scan, which finds it unchanged: the sweep re-enqueues such rows
once they have waited PIPELINE_REAP_WAITING_SECONDS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable

from pipeline import errors, masking
from pipeline.interrupts import Interrupts
from pipeline.models import Change
from pipeline.sources import producer
from pipeline.store import DEFAULT_MAX_ATTEMPTS, Registry

logger = logging.getLogger("pipeline.watch")


@dataclasses.dataclass
class ScanReport:
    """What one scan found and did."""

    pattern: str
    seen: int = 0
    new: int = 0
    changed: int = 0
    enqueued: int = 0
    refused: int = 0
    #: listing alone, and the whole scan (listing, registering, sending)
    list_seconds: float = 0.0
    seconds: float = 0.0
    #: one line saying why the scan was skipped, when it was
    error: str | None = None
    #: the signal that stopped the scan after its chunk in hand, when one did
    interrupted: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def line(self) -> str:
        """The scan's one line of output."""
        where = masking.scrub(self.pattern)
        if self.error is not None:
            return f"scan {where}: skipped after {self.seconds:.2f} s: {self.error}"
        text = (
            f"scan {where}: {self.seen} seen, {self.new} new, {self.changed} changed, "
            f"{self.enqueued} enqueued in {self.seconds:.2f} s (listing {self.list_seconds:.2f} s)"
        )
        if self.refused:
            text += f", {self.refused} listed names refused"
        if self.interrupted:
            text += f"; stopped by {self.interrupted} after the chunk in hand"
        return text

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def scan(
    store: Registry,
    pattern: str,
    send: Callable[[str, str], None],
    *,
    task_name: str = producer.DEFAULT_TASK,
    batch_id: str | None = None,
    file_type: str = "events",
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    chunk_size: int = producer.CHUNK,
    interrupts: Interrupts | None = None,
) -> ScanReport:
    """One scan of `pattern`; `send(task_name, url)` enqueues one task.

    A storage or database error skips the scan (`report.error`, one line, secrets scrubbed):
    whatever chunks were registered before it keep their tasks, and the next scan carries on.
    A pattern that can never be listed (unknown scheme, credentials in it) raises InvalidURL.
    """
    report = ScanReport(pattern)
    how = producer.Registering(task_name, batch_id, file_type, max_attempts)
    started = time.monotonic()
    try:
        # A signal during the listing (which may take seconds on a big prefix) ends it at
        # once: nothing is registered yet. The names are listed before anything is written.
        with interrupts.reading() if interrupts else contextlib.nullcontext():
            listed = list(producer.from_glob(pattern, refresh=True))
        report.list_seconds = time.monotonic() - started
        for start in range(0, len(listed), chunk_size):
            _scan_chunk(store, listed[start : start + chunk_size], send, report, how)
            if interrupts is not None and interrupts.received:
                report.interrupted = interrupts.received
                break
    except KeyboardInterrupt:
        report.interrupted = (interrupts.received if interrupts else None) or "SIGINT"
    except errors.InvalidURL:
        raise
    except Exception as error:  # storage (OSError, the SDK's own) or the database unreachable
        report.error = _one_line(error, store)
        logger.debug("scan of %s failed", masking.scrub(pattern), exc_info=True)
    report.seconds = time.monotonic() - started
    return report


def _scan_chunk(
    store: Registry,
    chunk: list[producer.Item],
    send: Callable[[str, str], None],
    report: ScanReport,
    how: producer.Registering,
) -> None:
    pairs = [(url, fp) for _, _, url, fp, _ in chunk if url is not None]
    report.refused += len(chunk) - len(pairs)
    if not pairs:
        return
    report.seen += len(pairs)
    for reg in how.register(store, pairs, changes_only=True):
        # Only what this statement created or regenerated: a row still pending from an
        # earlier scan (or from another watch of the same prefix) has its message already.
        if reg.change is Change.UNCHANGED:
            continue
        if reg.change is Change.NEW:
            report.new += 1
        else:
            report.changed += 1
        send(reg.task_name or how.task_name, reg.file_url)
        report.enqueued += 1


def _one_line(error: BaseException, store: Registry) -> str:
    if isinstance(error, errors.ListingFailed):
        text = str(error).splitlines()[0]  # it names its cause already
    else:
        text = errors.one_line(error)
    return masking.scrub(text[:500], getattr(store, "url", None))


def run(
    scan_once: Callable[[], ScanReport],
    every: float,
    *,
    interrupts: Interrupts,
    on_scan: Callable[[ScanReport], None],
    once: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> str | None:
    """Scan every `every` seconds (from the start of one scan to the next) until a signal;
    returns the signal's name (None after `once`). A signal during the sleep ends it at once;
    during a scan, the chunk in hand is finished first."""
    while True:
        report = scan_once()
        on_scan(report)
        if report.interrupted or interrupts.received:
            return report.interrupted or interrupts.received
        if once:
            return None
        try:
            with interrupts.reading():
                sleep(max(0.0, every - report.seconds))
        except KeyboardInterrupt:
            return interrupts.received or "SIGINT"
