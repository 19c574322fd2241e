"""What a task's output transaction offers besides SQLAlchemy's Connection: many rows in one
statement and a streamed COPY, on the transaction's own connection."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psycopg
import sqlalchemy as sa


def execute_many(connection: sa.Connection, sql: str, rows: Sequence[Mapping[str, Any]]) -> int:
    """Run one statement for many parameter sets on a task's connection; rows affected."""
    if not rows:
        return 0
    result = connection.execute(sa.text(sql), list(rows))
    return max(int(result.rowcount), 0)


def copy_rows(connection: sa.Connection, sql: str, rows: Iterable[Sequence[Any]]) -> int:
    """Stream rows through `COPY ... FROM STDIN` (text format) on a task's connection, inside
    its transaction; the rows copied.

    The rows are pulled as the copy goes (psycopg sends them in chunks), so memory stays flat
    however many there are. An exception from the rows (a file found bad halfway) ends the
    COPY with an error: the transaction is then aborted, and rolled back with everything in it.
    """
    driver: psycopg.Connection[Any] = connection.connection.driver_connection  # type: ignore[assignment]
    count = 0
    with driver.cursor() as cursor, cursor.copy(sql) as copy:
        write = copy.write_row
        for row in rows:
            write(row)
            count += 1
    return count


@dataclasses.dataclass(frozen=True)
class PgTransaction:
    """A transaction for a task's output on a SQLAlchemy Connection, whose methods it offers
    as its own (`execute`, ...), with `execute_many` and `copy_rows`."""

    connection: sa.Connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self.connection, name)

    def execute_many(self, sql: str, rows: Sequence[Mapping[str, Any]]) -> int:
        return execute_many(self.connection, sql, rows)

    def copy_rows(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        return copy_rows(self.connection, sql, rows)
