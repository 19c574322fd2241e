"""JSON Lines and CSV read as records, with the places between them where a read can resume.

JSON Lines (`.jsonl`, `.ndjson`, `.json`) or CSV with a header (`.csv`), optionally gzipped
(`.gz`): the format is told by the extension. A malformed line becomes a `Record` with a
`problem` and the file goes on. JSON is parsed with msgspec (measured 2.7x json.loads here); a
line it refuses is parsed again with the standard library, whose verdict (and message) is the
one kept. Opening the file and cutting it into checked lines is `pipeline.sources.textfile`'s;
checking each record's fields is `pipeline.reference.ingest`'s.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import posixpath
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import msgspec

from pipeline.reference.ingest import Record, parse_event
from pipeline.sources import textfile, urls
from pipeline.sources.textfile import BadInput, Block

JSON_LINES_EXTENSIONS = (".jsonl", ".ndjson", ".json")
CSV_EXTENSIONS = (".csv",)


class UnsupportedFormat(BadInput):
    """The file's extension names no format this task reads (.jsonl, .ndjson, .json, .csv)."""


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


_decoder = msgspec.json.Decoder()


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


def _file_name(url: str) -> str:
    if url.lower().startswith("file:") or "://" not in url:
        path = urls.local_path(url) if url.lower().startswith("file:") else url
        return os.path.basename(path)
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    return posixpath.basename(path)
