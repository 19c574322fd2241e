"""The reference task's records checked (an event, or why not), counted and turned into rows.

A record is valid with a non-blank string `id`, `ts` (ISO 8601) and `type`, and nothing
Postgres would refuse (a NUL, a lone surrogate, a non-finite number); the rest of its fields
are its payload. A file that cannot be read as text at all raises `BadInput` (retrying will
not help), while OSErrors such as FileNotFoundError propagate (retryable). Reading a file's
formats into records is `pipeline.reference.formats`'s.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import pathlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import msgspec

from pipeline import sqlfile
from pipeline.errors import PermanentError
from pipeline.models import Stats

# Re-exported: the task's callers and tests know them as ingest.BadInput and so on.
from pipeline.sources.textfile import MAX_LINE_BYTES as MAX_LINE_BYTES
from pipeline.sources.textfile import BadContent as BadContent
from pipeline.sources.textfile import BadInput as BadInput
from pipeline.sources.textfile import NotRegularFile as NotRegularFile

# The task's SQL (events.sql beside this module): what it deletes first and how it copies.
_EVENTS_SQL = sqlfile.named_blocks(pathlib.Path(__file__).with_name("events.sql"))
COPY_EVENTS_SQL = _EVENTS_SQL["copy_events"]
DELETE_EVENTS_SQL = _EVENTS_SQL["delete_events"]

MAX_EXAMPLES = 5
_REQUIRED = ("id", "ts", "type")
# `type` is in a btree index (events_type_ts_idx), whose entries Postgres caps at about
# 2.7 KB: a longer value would fail the whole file's transaction, so it is refused per line.
# `id` gets the same cap: an event id is a key, not a payload.
MAX_FIELD_BYTES = {"id": 1000, "type": 1000}
# Lengths (in characters) whose UTF-8 form cannot exceed the limits: most values skip the encode.
_SHORT_ID = MAX_FIELD_BYTES["id"] // 4
_SHORT_TYPE = MAX_FIELD_BYTES["type"] // 4


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


_encoder = msgspec.json.Encoder()


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
