"""Submit: stream URLs, register them in batches, enqueue one task for each file that needs one."""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import re
import socket
from collections.abc import Callable, Iterable, Iterator

from pipeline import errors, masking
from pipeline.interrupts import Interrupts
from pipeline.models import BatchSpec, Registration, Status
from pipeline.sources import lines, urls
from pipeline.store import DEFAULT_MAX_ATTEMPTS, Registry

DEFAULT_TASK = "pipeline.ingest"
# URLs per registration statement: one round trip per chunk, constant memory per chunk.
CHUNK = 1000
# Refused lines kept for the report; the rest are only counted (memory stays flat).
MAX_REFUSED_KEPT = 1000
# Batch, task and file-type names are indexed columns (Postgres caps an index entry at about
# 2.7 KB) and are shown in every status line: refused at submit beyond this, with the reason.
MAX_NAME_LENGTH = 200
_NAME_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028-\u202e\u2066-\u2069]")


def name_problem(kind: str, value: str) -> str | None:
    """Why a batch / task / file-type name cannot be used, or None."""
    if not value.strip():
        return f"{kind} name is empty"
    if len(value) > MAX_NAME_LENGTH:
        return f"{kind} name too long ({len(value)} characters; at most {MAX_NAME_LENGTH})"
    if found := _NAME_CONTROL.search(value):
        return f"{kind} name contains a control character (U+{ord(found.group()):04X})"
    return None


def check_name(kind: str, value: str) -> str:
    """`value`, or InvalidInput saying why it cannot be a name."""
    if problem := name_problem(kind, value):
        raise errors.InvalidInput(problem, kind=kind)
    return value


@dataclasses.dataclass
class SubmitReport:
    """What a submit did, updated chunk by chunk."""

    seen: int = 0
    enqueued: int = 0
    completed_before: int = 0
    dead_before: int = 0
    in_flight_before: int = 0
    #: registered without a message: their batch's limit sends them as its files end
    held: int = 0
    refused_count: int = 0
    refused: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)
    #: set when a signal stopped the submit; `last_line` is the last input line handled
    interrupted: str | None = None
    last_line: int = 0

    def refuse(self, line: int, text: str, reason: str) -> None:
        self.refused_count += 1
        if len(self.refused) < MAX_REFUSED_KEPT:
            self.refused.append((line, masking.scrub(text[:200]), reason))

    def add(self, part: SubmitReport) -> None:
        """Count `part` (the next source's report) in this one."""
        for field in _COUNTS:
            setattr(self, field, getattr(self, field) + getattr(part, field))
        self.refused.extend(part.refused[: MAX_REFUSED_KEPT - len(self.refused)])
        self.last_line = part.last_line or self.last_line
        self.interrupted = part.interrupted

    def plus(self, part: SubmitReport) -> SubmitReport:
        """The counts so far with `part` (a source in progress) added, for a progress line."""
        total = dataclasses.replace(self, refused=[])
        total.add(dataclasses.replace(part, refused=[]))
        return total


_COUNTS = (
    "seen",
    "enqueued",
    "completed_before",
    "dead_before",
    "in_flight_before",
    "held",
    "refused_count",
)


# URLs fingerprinted one by one at submit (see from_lines).
_STAT_SCHEMES = ("file:", "http://", "https://")

Item = tuple[int, str, str | None, str | None, str | None]
"""(line, raw text, url, fingerprint, refusal reason): one input item."""
Source = Iterator[Item]


@dataclasses.dataclass(frozen=True)
class Registering:
    """How submit and watch register the files they find: task, batch, file type, cap."""

    task_name: str
    batch_id: str | None
    file_type: str
    max_attempts: int

    def register(
        self, store: Registry, pairs: list[tuple[str, str | None]], *, changes_only: bool = False
    ) -> list[Registration]:
        """Register `pairs` (url, fingerprint) in one statement."""
        return store.register(
            pairs,
            batch_id=self.batch_id,
            file_type=self.file_type,
            task_name=self.task_name,
            max_attempts=self.max_attempts,
            changes_only=changes_only,
        )


def from_lines(items: Iterable[str | lines.Refused], *, fingerprints: bool = True) -> Source:
    """Input lines (arguments, a file, stdin) as normalised URLs; local files fingerprinted.

    A `lines.Refused` item (a line the bounded reader refused) keeps its line number.
    """
    for number, item in enumerate(items, start=1):
        if isinstance(item, lines.Refused):
            yield number, item.text, None, None, item.reason
            if item.final:
                return
            continue
        text = item.rstrip("\r\n")
        if not text.strip(" \t"):
            yield number, text, None, None, "empty line"
            continue
        try:
            url = urls.normalize(text)
        except errors.InvalidURL as exc:
            # The refusal's own copy of the text: credentials in it are masked.
            shown = str(exc.data.get("url") or text)
            yield number, shown, None, None, str(exc.data.get("reason", exc))
            continue
        # A stat is cheap locally. An HTTP URL has no listing to carry its fingerprint, so it
        # gets a HEAD (one round trip each): without it a changed file could never start a new
        # generation. Object stores go without: a HEAD per key is a billed request, and
        # `--glob` carries fingerprints from the listing at one request per 1,000 keys.
        fp = urls.fingerprint(url) if fingerprints and url.startswith(_STAT_SCHEMES) else None
        yield number, text, url, fp, None


def from_glob(pattern: str, *, refresh: bool = False) -> Source:
    """Files matching a glob on any fsspec filesystem, with fingerprints from the listing.

    `refresh` drops the filesystem's cached listings first: s3fs and others keep them per
    instance, and fsspec hands out one instance per configuration, so a long-running caller
    (watch) would otherwise list the same objects for ever.
    """
    if masking.has_userinfo(pattern):
        urls.normalize(pattern)  # refused: credentials belong in storage options
    if problem := urls.scheme_problem(pattern):
        raise errors.InvalidURL(f"--glob {masking.scrub(pattern)!r}: {problem}", url=pattern)
    try:
        fs, path = urls.filesystem(pattern)
    # fsspec's own errors for a scheme it does not know or cannot load
    except (ValueError, ImportError) as error:
        raise errors.InvalidURL(
            f"--glob {masking.scrub(pattern)!r}: {masking.scrub(str(error))}", url=pattern
        ) from error
    if refresh:
        fs.invalidate_cache()
    try:
        found = fs.glob(path, detail=True)
    # Whatever the backend raises (OSError, botocore's NoCredentialsError, a timeout): one
    # line naming the pattern, never the SDK's traceback.
    except Exception as error:
        raise errors.ListingFailed(
            f"could not list {masking.scrub(pattern)!r}: {masking.scrub(errors.one_line(error))}",
            url=pattern,
        ) from error
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
    store: Registry,
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
    interrupts: Interrupts | None = None,
) -> SubmitReport:
    """Register and enqueue; `send(task_name, url)` enqueues one task.

    With `interrupts` installed, a signal stops the submit after the chunk in hand
    (`report.interrupted` says which); the chunk itself is always finished.
    """
    for kind, name in (("task", task_name), ("batch", batch_id), ("file type", file_type)):
        if name is not None:
            check_name(kind, name)
    report = SubmitReport()
    how = Registering(task_name, batch_id, file_type, max_attempts)
    source = iter(source)
    if interrupts and interrupts.received:  # a signal before the first line: nothing is read
        report.interrupted = interrupts.received
    while report.interrupted is None:
        chunk: list[Item] = []
        exhausted = True
        try:
            with interrupts.reading() if interrupts else contextlib.nullcontext():
                for item in source:
                    chunk.append(item)
                    if len(chunk) >= chunk_size:
                        exhausted = False
                        break
        except KeyboardInterrupt:
            # Stopped while reading: the lines read so far are submitted, nothing after.
            report.interrupted = (interrupts.received if interrupts else None) or "SIGINT"
        _submit_chunk(store, chunk, send, report, how, force)
        if progress:
            progress(report)
        if interrupts and interrupts.received:
            report.interrupted = interrupts.received
        if exhausted:
            break
    return report


def _submit_chunk(
    store: Registry,
    chunk: list[Item],
    send: Callable[[str, str], None],
    report: SubmitReport,
    how: Registering,
    force: bool,
) -> None:
    """Register one chunk and send a task for each row that needs one."""
    pairs: list[tuple[str, str | None]] = []
    for line, raw, url, fp, reason in chunk:
        report.last_line = line
        if url is None:
            report.refuse(line, raw, reason or "refused")
        else:
            pairs.append((url, fp))
    if not pairs:
        return
    report.seen += len(pairs)
    task_name = how.task_name
    for reg in how.register(store, pairs):
        if reg.needs_task:
            send(reg.task_name or task_name, reg.file_url)
            report.enqueued += 1
        elif reg.held:
            report.held += 1
        elif reg.status is Status.COMPLETED:
            if force:
                for work in store.requeue(reg.file_url, statuses=[Status.COMPLETED], force=True):
                    send(work.task_name or task_name, work.file_url)
                    report.enqueued += 1
            else:
                report.completed_before += 1
        elif reg.status is Status.DEAD:
            report.dead_before += 1
        else:
            # Running or failed (waiting for its backoff): its task exists, or the reaper
            # re-enqueues it once it has waited long enough.
            report.in_flight_before += 1


@dataclasses.dataclass(frozen=True)
class Request:
    """What one `pipeline submit` asks for: its inputs and how to register them."""

    batch_id: str
    arguments: tuple[str, ...] = ()
    from_file: str | None = None
    pattern: str | None = None
    task_name: str = DEFAULT_TASK
    file_type: str = "events"
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    force: bool = False
    fingerprints: bool = True
    #: at most this many of the batch's files processing at once (None: no limit)
    concurrency: int | None = None
    #: a Celery task to run once every file of the batch is terminal (completed or dead)
    on_complete: str | None = None

    def batch(self) -> BatchSpec:
        """The batch row this submit opens (or adds to)."""
        return BatchSpec(
            self.batch_id,
            task_name=self.task_name,
            submitted_by=submitter(),
            concurrency=self.concurrency,
            on_complete=self.on_complete,
        )


def submitter() -> str:
    """Who submits: user@host (for the batch row; `status --batch` shows it)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        user = "?"
    return f"{user}@{socket.gethostname()}"


def submit_request(
    store: Registry,
    request: Request,
    send: Callable[[str, str], None],
    *,
    progress: Callable[[SubmitReport], None] | None = None,
    interrupts: Interrupts | None = None,
) -> SubmitReport:
    """Every source of `request` (input lines, then the glob), one report for them all."""
    sources: list[Source] = []
    if request.arguments or request.from_file:
        sources.append(
            from_lines(
                lines.input_lines(request.arguments, request.from_file),
                fingerprints=request.fingerprints,
            )
        )
    if request.pattern:
        sources.append(from_glob(request.pattern))
    for kind, name in (("batch", request.batch_id), ("task", request.on_complete)):
        if name is not None:
            check_name(kind, name)
    # The batch row first, with its settings: a file registered into it is never claimed
    # before its limit is known.
    store.open_batch(request.batch())
    report = SubmitReport()
    try:
        for source in sources:
            if report.interrupted:
                break
            part = submit(
                store,
                source,
                send,
                task_name=request.task_name,
                batch_id=request.batch_id,
                file_type=request.file_type,
                max_attempts=request.max_attempts,
                force=request.force,
                progress=None if progress is None else lambda r: progress(report.plus(r)),
                interrupts=interrupts,
            )
            report.add(part)
    except OSError as error:  # reading --from, stdin
        raise errors.PipelineError(f"submit stopped: {error}") from error
    return report
