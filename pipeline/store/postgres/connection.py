"""Connections to PostgreSQL: one driver connection per thread for the hot path, a small
SQLAlchemy pool for output transactions and migrations, and what a fork must let go of."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
from collections import namedtuple
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.rows import namedtuple_row, tuple_row
from sqlalchemy import exc as sa_exc

from pipeline import errors, masking
from pipeline.store.postgres.boundary import translate, unavailable
from pipeline.store.postgres.sqltext import (
    engine_url,
    libpq_url,
    positional_queries,
    queries,
)


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


def _row_type(name: str, cursor: psycopg.Cursor[Any]) -> Any:
    """A named tuple class for the rows of query `name`, from the columns of its result."""
    columns = [c.name for c in cursor.description or ()]
    return namedtuple(f"{name}_row", columns, rename=True)


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


class Connections:
    """The connections of one store object, shared by the threads of one process."""

    def __init__(self, database_url: str, *, pool_size: int = 2, echo: bool = False) -> None:
        self.url = database_url
        self._pool_size = pool_size
        self._echo = echo
        # Created on first use: only output transactions and migrations need SQLAlchemy, and
        # its dialect costs a short-lived CLI command (`pipeline status`) more than its query.
        self._sa_engine: sa.Engine | None = None
        self._q = queries()
        self._pq = positional_queries()
        self._row_types: dict[str, Any] = {}
        try:
            self._dsn = (
                engine_url(database_url)
                .set(drivername="postgresql")
                .render_as_string(hide_password=False)
            )
        # SQLAlchemy's message quotes the whole URL, password and all: scrubbed here.
        except (sa_exc.ArgumentError, ValueError, TypeError) as error:
            raise errors.InvalidInput(
                f"invalid database URL {masking.mask_invalid_url(database_url)}: "
                f"{masking.scrub(str(error), database_url)}"
            ) from error
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[psycopg.Connection[Any]] = []
        # Connections inherited over fork: kept referenced, never closed or collected, since
        # closing (or a finaliser) would end the parent's session on the shared socket.
        self._orphans: list[psycopg.Connection[Any]] = []
        self._tokens: collections.deque[int] = collections.deque()
        self._tokens_lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def _engine(self) -> sa.Engine:
        if self._sa_engine is None:
            self._sa_engine = sa.create_engine(
                engine_url(self.url),
                # Single calls run in autocommit: each transition is one statement, so a
                # BEGIN/COMMIT pair would only add round trips.
                isolation_level="AUTOCOMMIT",
                pool_size=self._pool_size,
                max_overflow=4,
                # No pre-ping (a round trip per checkout): a dead connection raises, SQLAlchemy
                # invalidates the pool, the caller retries with a fresh one.
                pool_pre_ping=False,
                echo=self._echo,
                connect_args={
                    # Generic plans cached while the table was small keep seq scans as it
                    # grows (measured in BASELINE.md); custom plans keep primary-key lookups.
                    "options": "-c plan_cache_mode=force_custom_plan",
                    "connect_timeout": 5,
                    "application_name": "pipeline",
                },
            )
        return self._sa_engine

    def _driver(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = psycopg.connect(
                self._dsn,
                autocommit=True,
                row_factory=namedtuple_row,
                connect_timeout=5,
                options="-c plan_cache_mode=force_custom_plan",
                application_name="pipeline",
            )
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _fast(self, name: str, params: Mapping[str, Any]) -> list[Any]:
        """Run a hot-path query on this thread's own connection (prepared after a few uses).

        The parameters go positionally and the rows come back as plain tuples, made named
        tuples here by a class kept per query (rebuilt when the column count changes): the
        same rows for less client CPU per call than psycopg's named parameters and
        namedtuple_row, which look the names up again on every call (issue 24)."""
        sql, names = self._pq[name]
        with translate(self.url):
            conn = self._driver()
            try:
                cur = conn.cursor(row_factory=tuple_row)
                rows = cur.execute(sql, tuple([params[n] for n in names])).fetchall()
                if not rows:
                    return rows
                make: Any = self._row_types.get(name)
                if make is None or len(make._fields) != len(rows[0]):
                    make = self._row_types[name] = _row_type(name, cur)
                return [make._make(r) for r in rows]
            except psycopg.Error:
                if conn.broken or conn.closed:
                    # Reconnect on the next call; the caller retries (StoreUnavailable).
                    self._local.conn = None
                    with self._lock, contextlib.suppress(ValueError):
                        self._conns.remove(conn)
                    conn.close()
                raise

    @contextlib.contextmanager
    def transaction(self, *, token: int | None = None) -> Iterator[PgTransaction]:
        with translate(self.url), self._engine.connect() as conn:
            conn = conn.execution_options(isolation_level="READ COMMITTED")
            with conn.begin():
                if token is not None:
                    # Named after the claim for this transaction only, so that a takeover can
                    # end it if this process turns zombie (pipeline_fence_v1).
                    conn.execute(self._q["name_session"], {"name": f"pipeline-claim:{token}"})
                yield PgTransaction(conn)

    def unavailable(self, error: BaseException) -> bool:
        return unavailable(self.url, error)

    def libpq_url(self) -> tuple[str, str | None]:
        return libpq_url(self.url)

    def after_fork(self) -> None:
        # A fork copies locks in whatever state the parent's other threads (the lease keeper,
        # the worker's sweeper) left them: start with fresh ones.
        self._lock = threading.Lock()
        # Connections opened by the parent must not be shared with it (close=False leaves
        # the parent's sockets alone).
        if self._sa_engine is not None:
            self._sa_engine.dispose(close=False)
        with self._lock:
            self._orphans.extend(self._conns)
            self._conns = []
        self._tokens = collections.deque()
        self._tokens_lock = threading.Lock()  # a fork copies a lock in whatever state it was
        self._local = threading.local()

    def close(self) -> None:
        if self._sa_engine is not None:
            self._sa_engine.dispose()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    def execute_script(self, sql: str) -> None:
        """Run a multi-statement script (tests and tools)."""
        with translate(self.url), self._engine.connect() as conn:
            driver = conn.connection.driver_connection
            assert driver is not None
            driver.execute(sql)

    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        """One value from an ad-hoc query (tests and tools)."""
        with translate(self.url), self._engine.connect() as conn:
            return conn.execute(sa.text(sql), dict(params or {})).scalar()
