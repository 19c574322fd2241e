"""A file's records cut into chunks that each end where a read can resume, and the position a
chunk commits: the lines read, the byte of the raw stream, a CSV file's header.

A chunk ends at the first boundary (the end of a block of whole lines, between two records)
after PIPELINE_CHUNK_RECORDS records or PIPELINE_CHUNK_BYTES bytes of the raw stream
(pipeline/settings.py), whichever comes first; the last chunk ends at the end of the file.
Records flow through as they are read: a chunk is never held in memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from pipeline import settings
from pipeline.reference.formats import Boundary
from pipeline.reference.ingest import Record
from pipeline.sources.resumable import BEGINNING, Start


@dataclasses.dataclass(frozen=True)
class Position:
    """What a chunk commits as its position (JSON), and where it resumes a read."""

    line: int
    offset: int | None
    header: tuple[str, ...] | None = None

    @classmethod
    def of(cls, boundary: Boundary) -> Position:
        return cls(boundary.line, boundary.offset, boundary.header)

    @classmethod
    def load(cls, value: Any) -> Position | None:
        """The position a chunk committed (None: none, or not one of this task's)."""
        if not isinstance(value, Mapping) or not isinstance(value.get("line"), int):
            return None
        offset = value.get("offset")
        header = value.get("header")
        return cls(
            value["line"],
            offset if isinstance(offset, int) else None,
            tuple(header) if isinstance(header, list) else None,
        )

    def dump(self) -> dict[str, Any]:
        out: dict[str, Any] = {"line": self.line, "offset": self.offset}
        if self.header is not None:
            out["header"] = list(self.header)
        return out

    @property
    def start(self) -> Start:
        return Start(self.line, self.offset)


def start_of(position: Position | None) -> Start:
    return BEGINNING if position is None else position.start


class Piece:
    """The records of one chunk, read as they are iterated; `end` is where it stopped."""

    def __init__(
        self, items: Iterator[Record | Boundary], records: int, size: int, since: int | None
    ) -> None:
        self._items = items
        self._records = records
        self._size = size
        self._since = since
        self.end: Boundary | None = None
        self.exhausted = False

    def __iter__(self) -> Iterator[Record]:
        count = 0
        for item in self._items:
            if isinstance(item, Boundary):
                self.end = item
                grown = (
                    0 if item.offset is None or self._since is None else item.offset - self._since
                )
                if count >= self._records or grown >= self._size:
                    return
                continue
            count += 1
            yield item
        self.exhausted = True


def pieces(
    items: Iterator[Record | Boundary],
    start: Start,
    *,
    records: int | None = None,
    size: int | None = None,
) -> Iterator[Piece]:
    """The chunks of a file's records read from `start`: at least one (an empty file commits
    its end too). Each is to be read to its end before the next is asked for."""
    records = records or settings.CHUNK_RECORDS.get()
    size = size or settings.CHUNK_BYTES.get()
    since = start.offset
    while True:
        piece = Piece(items, records, size, since)
        yield piece
        if piece.exhausted:
            return
        since = piece.end.offset if piece.end is not None else since
