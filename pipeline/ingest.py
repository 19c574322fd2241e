"""The reference ingest task's pure logic: stream a file's records and validate each one.

JSON Lines (`.jsonl`, `.ndjson`, `.json`) or CSV with a header (`.csv`), optionally gzipped
(`.gz`), read through fsspec in constant memory. A malformed line becomes a `Record` with a
`problem` and the file goes on; a file that cannot be read as text at all raises `BadInput`
(retrying will not help), while OSErrors such as FileNotFoundError propagate (retryable).
JSON is parsed with msgspec (measured 2.7x json.loads here); a line it refuses is parsed
again with the standard library, whose verdict (and message) is the one kept.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import gzip
import json
import math
import os
import posixpath
import stat
import urllib.parse
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, BinaryIO

import fsspec
import msgspec
from fsspec.implementations.local import LocalFileSystem

from pipeline import urls
from pipeline.errors import PermanentError
from pipeline.models import Stats

# Executed by the task inside the checkpoint transaction, after DELETE_EVENTS_SQL: the file's
# old events are gone first, so the unique (file_url, line) cannot conflict and plain COPY
# does (no ON CONFLICT). Rows are copy_rows() tuples, in this column order.
COPY_EVENTS_SQL = "COPY events (file_url, line, event_id, ts, type, payload) FROM STDIN"
# Run first, in the same transaction: a file's events are those of its latest run only (a new
# generation, changed content or requeue --force, replaces the old records).
DELETE_EVENTS_SQL = "DELETE FROM events WHERE file_url = :file_url"

JSON_LINES_EXTENSIONS = (".jsonl", ".ndjson", ".json")
CSV_EXTENSIONS = (".csv",)
MAX_EXAMPLES = 5
# A "line" this long is almost surely a binary file without newlines; refusing it keeps
# memory bounded instead of buffering the whole file.
MAX_LINE_BYTES = 32 * 1024 * 1024
_CHUNK_BYTES = 1024 * 1024
_REQUIRED = ("id", "ts", "type")
# `type` is in a btree index (events_type_ts_idx), whose entries Postgres caps at about
# 2.7 KB: a longer value would fail the whole file's transaction, so it is refused per line.
# `id` gets the same cap: an event id is a key, not a payload.
MAX_FIELD_BYTES = {"id": 1000, "type": 1000}
# Lengths (in characters) whose UTF-8 form cannot exceed the limits: most values skip the encode.
_SHORT_ID = MAX_FIELD_BYTES["id"] // 4
_SHORT_TYPE = MAX_FIELD_BYTES["type"] // 4


# PermanentError is what the @checkpointed decorator treats as not worth a retry.
class BadInput(PermanentError):
    """The file cannot be processed as it is; retrying will not help."""


class BadContent(BadInput):
    """The file is not UTF-8 text (binary, another encoding, or a broken gzip stream)."""


class NotRegularFile(BadInput):
    """The URL names something that is not a regular file (a FIFO, a directory, a device)."""


class UnsupportedFormat(BadInput):
    """The file's extension names no format this task reads (.jsonl, .ndjson, .json, .csv)."""


# For the task's retry policy: everything else (OSError included) is worth another attempt.
NON_RETRYABLE: tuple[type[BaseException], ...] = (PermanentError,)


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """A valid record: its id, an aware timestamp, its type, and every other field."""

    id: str
    ts: dt.datetime
    type: str
    payload: Mapping[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One record of a file: an event, or the problem that filtered it out."""

    line: int
    event: Event | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.event is not None

    def describe(self) -> str:
        """`line N: problem`, as shown in examples and error messages."""
        return f"line {self.line}: {self.problem or 'ok'}"


@dataclasses.dataclass(slots=True)
class Tally:
    """Counts of one file's records, with the first few problems as examples."""

    total: int = 0
    filtered: int = 0
    candidates: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)

    def add(self, record: Record) -> None:
        self.total += 1
        if record.ok:
            self.candidates += 1
            return
        self.filtered += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(record.describe())

    def add_all(self, records: Iterable[Record]) -> Tally:
        for record in records:
            self.add(record)
        return self

    def stats(self, persisted: int | None = None) -> Stats:
        """The task's stats; persisted defaults to the candidates (all valid records)."""
        return Stats(
            total=self.total,
            filtered=self.filtered,
            persisted=self.candidates if persisted is None else persisted,
        )

    def details(self) -> dict[str, Any]:
        """What goes into the checkpoint's details: the example problems."""
        return {"problems": list(self.examples)}


def file_format(url: str) -> tuple[str, str | None]:
    """("jsonl" or "csv", "gzip" or None) from the URL's extension; raises UnsupportedFormat."""
    name = _file_name(url).lower()
    compression = None
    if name.endswith(".gz"):
        name, compression = name[: -len(".gz")], "gzip"
    if name.endswith(JSON_LINES_EXTENSIONS):
        return "jsonl", compression
    if name.endswith(CSV_EXTENSIONS):
        return "csv", compression
    raise UnsupportedFormat(
        f"unsupported file extension: {_file_name(url)!r} "
        "(expected .jsonl, .ndjson, .json or .csv, optionally .gz)",
        url=url,
    )


def read_records(url: str) -> Iterator[Record]:
    """Stream the file's records in order; the format is checked now, the file read lazily."""
    kind, compression = file_format(url)
    fs, path = urls.filesystem(url)
    return _records(url, _open(url, fs, path, compression), kind)


def copy_rows(file_url: str, records: Iterable[Record], tally: Tally) -> Iterator[tuple[Any, ...]]:
    """The COPY_EVENTS_SQL rows of the valid records; every record is counted into tally."""
    encode = _encoder.encode
    add = tally.add
    for record in records:
        add(record)
        event = record.event
        if event is not None:
            # msgspec writes JSON escapes for control characters and never NaN (refused when
            # read); text, not bytes: psycopg would send bytes as bytea.
            payload = encode(event.payload).decode("utf-8")
            yield (file_url, record.line, event.id, event.ts, event.type, payload)


def parse_event(fields: Mapping[str, Any], *, checked: bool = False) -> Event | str:
    """The event a record's fields describe, or the short reason it is not valid.

    checked: the caller knows no value can hold a NUL, a lone surrogate or a non-finite
    number (the line had no \\u escape and its numbers were range-checked), so the walk
    over every value is skipped.
    """
    # Any: checked just below, in one test for speed (isinstance does not narrow through it).
    event_id: Any = fields.get("id")
    text: Any = fields.get("ts")
    kind: Any = fields.get("type")
    # The common case in one test (a non-blank string each, short enough that len * 4, a
    # bound on the UTF-8 size, is within the limit); anything else gets the reason below.
    if not (
        isinstance(event_id, str)
        and isinstance(text, str)
        and isinstance(kind, str)
        and len(event_id) <= _SHORT_ID
        and len(kind) <= _SHORT_TYPE
        and event_id.strip()
        and kind.strip()
    ) and (problem := _field_problem(fields)):
        return problem
    ts = parse_ts(text)
    if ts is None:
        # A blank ts is not tested above (parsing refuses it): said as missing here.
        return _field_problem(fields) or "ts not ISO 8601"
    payload = dict(fields)
    for key in _REQUIRED:
        del payload[key]
    if not checked and (problem := _unstorable(event_id, kind, payload)):
        return problem
    return Event(id=event_id, ts=ts, type=kind, payload=payload)


def _field_problem(fields: Mapping[str, Any]) -> str | None:
    """Why the required fields are not valid (the first of id, ts, type that is not)."""
    for key in _REQUIRED:
        value = fields.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            return f"missing {key}"
        if not isinstance(value, str):
            return f"{key} is not a string"
        limit = MAX_FIELD_BYTES.get(key)
        if limit is not None and len(value) * 4 > limit:
            size = len(value.encode("utf-8", "surrogatepass"))
            if size > limit:
                return f"{key} longer than {limit} bytes ({size})"
    return None  # long, but within the limits once encoded


def parse_ts(text: str) -> dt.datetime | None:
    """An aware datetime from ISO 8601 (trailing Z accepted, naive taken as UTC), or None."""
    text = text.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    try:
        ts = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=dt.UTC)


# -- reading ---------------------------------------------------------------------------------

_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


@contextlib.contextmanager
def _open(url: str, fs: Any, path: str, compression: str | None) -> Iterator[Any]:
    """The file's bytes, opened only if it is a regular file (or an object)."""
    if isinstance(fs, LocalFileSystem):
        with _open_local(url, path) as raw:
            if compression is None:
                yield raw
            else:
                with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                    yield unzipped
        return
    info = fs.info(path)
    if info.get("type") not in ("file", None):
        raise NotRegularFile(f"not a regular file: {info.get('type')}", url=url)
    # OpenFile rather than fsspec.open(url): fsspec would not percent-decode a file:// URL.
    with fsspec.core.OpenFile(fs, path, mode="rb", compression=compression) as stream:
        yield stream


@contextlib.contextmanager
def _open_local(url: str, path: str) -> Iterator[BinaryIO]:
    # O_NONBLOCK: opening a FIFO must not wait for a writer; the check is on the descriptor
    # opened (fstat), so a file swapped for a FIFO after a stat cannot slip through.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise NotRegularFile(f"not a regular file: {path} is {kind}", url=url)
        os.set_blocking(fd, True)
        raw = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with raw:
        yield raw


def _records(url: str, opener: Any, kind: str) -> Iterator[Record]:
    try:
        with opener as stream:
            blocks = _line_blocks(url, stream)
            yield from _json_records(blocks) if kind == "jsonl" else _csv_records(blocks)
    # A broken gzip stream is content, not an outage: the next attempt reads the same bytes.
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise BadContent(f"not a valid gzip file: {exc}", url=url) from exc


_BOM = "\ufeff".encode()


def _line_blocks(url: str, stream: Any) -> Iterator[tuple[int, list[bytes], bool]]:
    """(number of the first line, lines without their b"\\n", whether each had one) in
    blocks of whole lines, each block checked at once: no NUL byte and strict UTF-8, or
    BadContent. Only the file's last line can lack its newline.

    A block ends on a newline, which no UTF-8 sequence contains, so checking a block is
    checking each of its lines; the error names the first bad line, as a line-by-line
    check would.
    """
    pending = bytearray()
    number = 1
    while chunk := stream.read(_CHUNK_BYTES):
        end = chunk.rfind(b"\n")
        if end == -1:
            pending += chunk
            if len(pending) > MAX_LINE_BYTES:
                raise BadContent(
                    f"line {number} is longer than {MAX_LINE_BYTES // 2**20} MiB; not a text file?",
                    url=url,
                    line=number,
                )
            continue
        block = bytes(pending) + chunk[:end] if pending else chunk[:end]
        pending = bytearray(chunk[end + 1 :])
        lines = _checked(url, number, block)
        yield number, lines, True
        number += len(lines)
    if pending:
        yield number, _checked(url, number, bytes(pending)), False


def _checked(url: str, number: int, block: bytes) -> list[bytes]:
    # (line, rank, problem): the first bad line wins and, on one line, a NUL before bad UTF-8.
    bad: list[tuple[int, int, str]] = []
    if (nul := block.find(b"\x00")) != -1:
        bad.append((block.count(b"\n", 0, nul), 0, "binary content (NUL byte)"))
    if not block.isascii():
        try:
            block.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = block.count(b"\n", 0, exc.start)
            bad.append((line, 1, f"not UTF-8 text: byte 0x{block[exc.start]:02x}"))
    if bad:
        offset, _rank, problem = min(bad)
        line = number + offset
        raise BadContent(f"{problem} on line {line}", url=url, line=line)
    lines = block.split(b"\n")
    if number == 1:
        # Spreadsheet exports start with a byte order mark; it is not part of the header.
        lines[0] = lines[0].removeprefix(_BOM)
    return lines


_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def _json_records(blocks: Iterable[tuple[int, list[bytes], bool]]) -> Iterator[Record]:
    decode = _decoder.decode
    for first, lines, _ended in blocks:
        for number, raw in enumerate(lines, start=first):
            text = raw.strip()
            if not text:
                continue
            try:
                fields = decode(text)
            # msgspec refuses what json refuses, and also lone surrogates, numbers out of
            # range and deep nesting: the standard library's verdict and words are kept.
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
                yield _json_record_slowly(number, text.decode("utf-8"))
                continue
            if not isinstance(fields, dict):
                yield Record(number, problem="not a JSON object")
                continue
            # Without a \u escape no string can hold a NUL or a lone surrogate (the bytes are
            # checked UTF-8 without NUL), and msgspec refused every non-finite number.
            yield _record(number, fields, checked=b"\\u" not in text)


def _json_record_slowly(number: int, text: str) -> Record:
    try:
        fields = json.loads(text, parse_constant=_refuse_constant)
    except _NonFinite:
        return Record(number, problem="not valid JSON: NaN and Infinity are not allowed")
    except json.JSONDecodeError as exc:
        return Record(number, problem=f"not valid JSON: {exc.msg} at column {exc.colno}")
    # Deep nesting and over-long integers fail inside the decoder, not as JSONDecodeError.
    except RecursionError:
        return Record(number, problem="not valid JSON: nested too deeply")
    except ValueError as exc:
        return Record(number, problem=f"not valid JSON: {str(exc)[:80]}")
    if not isinstance(fields, dict):
        return Record(number, problem="not a JSON object")
    return _record(number, fields)


def _csv_lines(blocks: Iterable[tuple[int, list[bytes], bool]]) -> Iterator[str]:
    for _first, lines, ended in blocks:
        if ended:
            # The newline back on: csv needs it inside a quoted field that spans lines.
            yield from (raw.decode("utf-8") + "\n" for raw in lines)
        else:
            yield from (raw.decode("utf-8") for raw in lines)


def _csv_records(blocks: Iterable[tuple[int, list[bytes], bool]]) -> Iterator[Record]:
    reader = csv.reader(_csv_lines(blocks))
    header: list[str] | None = None
    while True:
        # A row spans several physical lines when a quoted field holds a newline.
        first_line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield from _refused_row(first_line, reader.line_num, f"not valid CSV: {exc}")
            continue
        if not row:
            continue  # blank line
        if header is None:
            header = [name.strip() for name in row]
            continue
        if len(row) != len(header):
            problem = f"{len(row)} fields, header has {len(header)}"
            yield from _refused_row(first_line, reader.line_num, problem)
            continue
        # Strings of checked UTF-8 text without NUL: nothing Postgres would refuse.
        record = _record(first_line, dict(zip(header, row, strict=True)), checked=True)
        if record.ok:
            yield record
        else:
            yield from _refused_row(first_line, reader.line_num, record.problem or "invalid")


def _refused_row(first: int, last: int, problem: str) -> Iterator[Record]:
    """A refused row, and every further physical line it swallowed (an unclosed quote takes
    the rest of the file), each counted as filtered rather than silently lost."""
    if last <= first:
        yield Record(first, problem=problem)
        return
    yield Record(first, problem=f"{problem} (row spans lines {first}-{last}; unclosed quote?)")
    for number in range(first + 1, last + 1):
        yield Record(number, problem=f"inside the malformed row that starts on line {first}")


def _record(number: int, fields: Mapping[str, Any], *, checked: bool = False) -> Record:
    parsed = parse_event(fields, checked=checked)
    if isinstance(parsed, str):
        return Record(number, problem=parsed)
    return Record(number, event=parsed)


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    # Postgres jsonb has no NaN or Infinity: accepting them here would fail the insert later.
    raise _NonFinite(name)


def _unstorable(*values: Any) -> str | None:
    """Why Postgres would reject a value (text or jsonb), or None; walks without recursion."""
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return "contains a NUL character (\\u0000)"
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate, from a "\ud800" escape in JSON
                return "contains an unpaired surrogate"
        elif isinstance(value, float):
            if not math.isfinite(value):
                return "number out of range"
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return None


def _file_name(url: str) -> str:
    if url.lower().startswith("file:") or "://" not in url:
        path = urls.local_path(url) if url.lower().startswith("file:") else url
        return os.path.basename(path)
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    return posixpath.basename(path)
