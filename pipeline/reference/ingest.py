"""The reference ingest task's pure logic: stream a file's records and validate each one.

JSON Lines (`.jsonl`, `.ndjson`, `.json`) or CSV with a header (`.csv`), optionally gzipped
(`.gz`), read through fsspec in constant memory. A malformed line becomes a `Record` with a
`problem` and the file goes on; a file that cannot be read as text at all raises `BadInput`
(retrying will not help), while OSErrors such as FileNotFoundError propagate (retryable).
JSON is parsed with msgspec (measured 2.7x json.loads here); a line it refuses is parsed
again with the standard library, whose verdict (and message) is the one kept. Opening the
file and cutting it into checked lines is `pipeline.textfile`'s.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import math
import os
import pathlib
import posixpath
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import msgspec

from pipeline import sqlfile
from pipeline.errors import PermanentError
from pipeline.models import Stats
from pipeline.sources import textfile, urls

# Re-exported: the task's callers and tests know them as ingest.BadInput and so on.
from pipeline.sources.textfile import MAX_LINE_BYTES as MAX_LINE_BYTES
from pipeline.sources.textfile import BadContent as BadContent
from pipeline.sources.textfile import BadInput as BadInput
from pipeline.sources.textfile import Block
from pipeline.sources.textfile import NotRegularFile as NotRegularFile

# The task's SQL (events.sql beside this module): what it deletes first and how it copies.
_EVENTS_SQL = sqlfile.named_blocks(pathlib.Path(__file__).with_name("events.sql"))
COPY_EVENTS_SQL = _EVENTS_SQL["copy_events"]
DELETE_EVENTS_SQL = _EVENTS_SQL["delete_events"]

JSON_LINES_EXTENSIONS = (".jsonl", ".ndjson", ".json")
CSV_EXTENSIONS = (".csv",)
MAX_EXAMPLES = 5
_REQUIRED = ("id", "ts", "type")
# `type` is in a btree index (events_type_ts_idx), whose entries Postgres caps at about
# 2.7 KB: a longer value would fail the whole file's transaction, so it is refused per line.
# `id` gets the same cap: an event id is a key, not a payload.
MAX_FIELD_BYTES = {"id": 1000, "type": 1000}
# Lengths (in characters) whose UTF-8 form cannot exceed the limits: most values skip the encode.
_SHORT_ID = MAX_FIELD_BYTES["id"] // 4
_SHORT_TYPE = MAX_FIELD_BYTES["type"] // 4


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

    @classmethod
    def resumed(cls, stats: Stats) -> Tally:
        """The counts a resumed read starts from: those committed with its position."""
        return cls(total=stats.total, filtered=stats.filtered, candidates=stats.persisted)

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
    items = records(kind, textfile.read_blocks(url, compression))
    return (item for item in items if isinstance(item, Record))


@dataclasses.dataclass(frozen=True, slots=True)
class Boundary:
    """A place between two records where a read can stop and resume: after `line` lines, at
    byte `offset` of the raw stream (None: gzip, resumed by skipping lines), with the CSV
    header read so far (resumed reads need it)."""

    line: int
    offset: int | None
    header: tuple[str, ...] | None = None


def records(
    kind: str, blocks: Iterator[Block], *, line: int = 0, header: Sequence[str] | None = None
) -> Iterator[Record | Boundary]:
    """The records of `blocks` (which start after `line` lines), with a Boundary after each
    block that ends between two records (`header`: a CSV file's, when they start after it)."""
    if kind == "jsonl":
        return _json_records(blocks)
    return _csv_records(blocks, line, None if header is None else list(header))


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


# -- parsing ---------------------------------------------------------------------------------


_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def _json_records(blocks: Iterable[Block]) -> Iterator[Record | Boundary]:
    decode = _decoder.decode
    for first, lines, _ended, end in blocks:
        yield from _json_lines(decode, first, lines)
        yield Boundary(first + len(lines) - 1, end)


def _json_lines(decode: Any, first: int, lines: list[bytes]) -> Iterator[Record]:
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


class _CsvLines:
    """The physical lines of the blocks as csv wants them, knowing where each block ended."""

    def __init__(self, blocks: Iterable[Block]) -> None:
        self.blocks = blocks
        self.pulled = 0  # lines handed to the csv reader
        self.block_last = 0  # the last line of the block those came from
        self.block_end: int | None = 0

    def __iter__(self) -> Iterator[str]:
        for first, lines, ended, end in self.blocks:
            self.block_last, self.block_end = first + len(lines) - 1, end
            for raw in lines:
                self.pulled += 1
                # The newline back on: csv needs it inside a quoted field that spans lines.
                yield raw.decode("utf-8") + "\n" if ended else raw.decode("utf-8")


def _csv_records(
    blocks: Iterable[Block], line: int, header: list[str] | None
) -> Iterator[Record | Boundary]:
    source = _CsvLines(blocks)
    reader = csv.reader(source)
    while True:
        # Between two rows the reader has read exactly the lines it handed back: where they
        # end a block is a place to resume from (a row may span blocks: then the next end is).
        if source.pulled and line + source.pulled == source.block_last:
            yield Boundary(
                source.block_last, source.block_end, None if header is None else tuple(header)
            )
        # A row spans several physical lines when a quoted field holds a newline.
        first_line = line + reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield from _refused_row(first_line, line + reader.line_num, f"not valid CSV: {exc}")
            continue
        if not row:
            continue  # blank line
        if header is None:
            header = [name.strip() for name in row]
            continue
        if len(row) != len(header):
            problem = f"{len(row)} fields, header has {len(header)}"
            yield from _refused_row(first_line, line + reader.line_num, problem)
            continue
        # Strings of checked UTF-8 text without NUL: nothing Postgres would refuse.
        record = _record(first_line, dict(zip(header, row, strict=True)), checked=True)
        if record.ok:
            yield record
        else:
            yield from _refused_row(first_line, line + reader.line_num, record.problem or "invalid")


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
