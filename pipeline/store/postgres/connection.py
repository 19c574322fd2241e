"""Connections to PostgreSQL: one driver connection per thread, for the hot path and for the
output transactions of the tasks that thread runs; a small SQLAlchemy pool for what operators
and tools read in bulk and for migrations; and what a fork must let go of."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from collections import namedtuple
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.rows import tuple_row
from sqlalchemy import exc as sa_exc

from pipeline import errors, masking, settings
from pipeline.store.postgres.boundary import translate, unavailable
from pipeline.store.postgres.link import Deadlines, Link
from pipeline.store.postgres.sqltext import engine_url, libpq_url, positional_queries, queries

# What operators and tools read and write in bulk (status, metrics, submit's registration,
# requeue): its time grows with the table or the input, so it runs without the store calls'
# bound, on a connection without a statement timeout (keepalives and tcp_user_timeout still
# end a dead link). Everything else, the workers' calls, is bounded (link.py).
_PATIENT = frozenset(
    {
        "summary",
        "activity",
        "dead",
        "totals",
        "running",
        "ops_state",
        "ops_batches",
        "ops_attempts",
        "ops_pickup",
        "register",
        "requeue",
    }
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


class _ThreadsOwn(sa.pool.Pool):
    """A SQLAlchemy pool that hands each thread the store's own connection of that thread
    (`Connections._driver`), so that a task's output transaction runs on the connection its
    claim and completion use: one connection per busy pool process for both, not two.

    The store owns the connections: a record whose connection the store closed or replaced
    (idle close, a broken link) is dropped, never closed here, and a new one wraps the thread's
    connection of the moment."""

    def __init__(self, creator: Any, current: Any, **kw: Any) -> None:
        super().__init__(creator, **kw)
        self._current = current  # the calling thread's open connection, or None
        self._local = threading.local()

    def _do_get(self) -> Any:
        record = getattr(self._local, "record", None)
        conn = self._current()
        if record is None or conn is None or record.dbapi_connection is not conn:
            record = self._create_connection()  # the creator opens one if the thread has none
            self._local.record = record
        return record

    def _do_return_conn(self, record: Any) -> None:
        pass  # stays the thread's, open, for its next call

    def dispose(self) -> None:
        self._local = threading.local()

    def recreate(self) -> _ThreadsOwn:
        return _ThreadsOwn(
            self._creator,
            self._current,
            recycle=self._recycle,
            echo=self.echo,
            pre_ping=self._pre_ping,
            logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return,
            _dispatch=self.dispatch,
            dialect=self._dialect,
        )

    def status(self) -> str:
        return "each thread's own connection"


class Connections:
    """The connections of one store object, shared by the threads of one process."""

    def __init__(
        self,
        database_url: str,
        *,
        pool_size: int = 2,
        echo: bool = False,
        pooler: str | None = None,
        direct_url: str | None = None,
        timeout: float | None = None,
        idle_seconds: float | None = None,
    ) -> None:
        self.url = database_url
        self._pool_size = pool_size
        self._echo = echo
        self.link = Link.from_settings(pooler, timeout)
        # What needs a session of its own (migrations) goes around the pooler when it can.
        self.direct_url = direct_url or settings.DATABASE_DIRECT_URL.get() or database_url
        self._deadlines = Deadlines(self.link.deadline, self._close_if_idle)
        # Connections unused this long are closed (the next call opens one again).
        self.idle_seconds = (
            idle_seconds if idle_seconds is not None else settings.DATABASE_IDLE_SECONDS.get()
        )
        self._busy = 0  # calls and output transactions under way, on every thread
        self._last_used = time.monotonic()
        # Created on first use: only output transactions and migrations need SQLAlchemy, and
        # its dialect costs a short-lived CLI command (`pipeline status`) more than its query.
        self._sa_engine: sa.Engine | None = None
        self._sa_direct: sa.Engine | None = None
        self._sa_own: sa.Engine | None = None  # output transactions, on each thread's own
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

    def _make_engine(self, url: str, *, pool_size: int, direct: bool) -> sa.Engine:
        link = dataclasses.replace(self.link, pooler="none") if direct else self.link
        engine = sa.create_engine(
            engine_url(url),
            # Single calls run in autocommit: each transition is one statement, so a
            # BEGIN/COMMIT pair would only add round trips.
            isolation_level="AUTOCOMMIT",
            pool_size=pool_size,
            max_overflow=4,
            # No pre-ping (a round trip per checkout): a dead connection raises, SQLAlchemy
            # invalidates the pool, the caller retries with a fresh one.
            pool_pre_ping=False,
            echo=self._echo,
            connect_args=link.connect_args(),
        )
        first = link.session_sql(statement_timeout=False)
        if first is not None:

            @sa.event.listens_for(engine, "connect")
            def _session(dbapi_connection: Any, _record: Any) -> None:
                autocommit = dbapi_connection.autocommit
                dbapi_connection.autocommit = True
                dbapi_connection.execute(first)
                dbapi_connection.autocommit = autocommit

        return engine

    @property
    def _engine(self) -> sa.Engine:
        if self._sa_engine is None:
            self._sa_engine = self._make_engine(self.url, pool_size=self._pool_size, direct=False)
        return self._sa_engine

    @property
    def _own_engine(self) -> sa.Engine:
        """For output transactions: on the calling thread's own connection (`_ThreadsOwn`)."""
        if self._sa_own is None:
            pool = _ThreadsOwn(
                lambda: self._driver(own=True), self._current, reset_on_return="rollback"
            )
            self._sa_own = sa.create_engine(
                engine_url(self.url), pool=pool, isolation_level="AUTOCOMMIT", echo=self._echo
            )
        return self._sa_own

    def _current(self) -> psycopg.Connection[Any] | None:
        """This thread's own connection, if it has one open."""
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        return None if conn is None or conn.closed else conn

    @property
    def _session_engine(self) -> sa.Engine:
        """For migrations: on the direct URL when one is given (around the pooler)."""
        if self.direct_url == self.url:
            return self._engine
        if self._sa_direct is None:
            self._sa_direct = self._make_engine(self.direct_url, pool_size=1, direct=True)
        return self._sa_direct

    def _driver(self, *, own: bool = False) -> psycopg.Connection[Any]:
        """This thread's connection for a call: its own, or, while its own is in an output
        transaction (a call from inside the task's block), a spare one, so that the call is
        never part of the task's transaction. `own`: the thread's own, always."""
        slot = "conn" if own or not getattr(self._local, "lent", False) else "spare"
        conn: psycopg.Connection[Any] | None = getattr(self._local, slot, None)
        if conn is None or conn.closed:
            if conn is not None:  # closed by the idle close, or by SQLAlchemy on a lost link
                with self._lock, contextlib.suppress(ValueError):
                    self._conns.remove(conn)
            # Plain tuples: the hot path names them itself (`_fast`), SQLAlchemy wants tuples.
            conn = psycopg.connect(
                self._dsn, autocommit=True, row_factory=tuple_row, **self.link.connect_args()
            )
            first = self.link.session_sql(statement_timeout=True)
            if first is not None:
                try:
                    with self._deadlines.bound(conn.fileno()):
                        conn.execute(first)  # no parameters: several statements allowed
                except BaseException:
                    conn.close()
                    raise
            setattr(self._local, slot, conn)
            with self._lock:
                self._conns.append(conn)
        return conn

    def _forget(self, conn: psycopg.Connection[Any]) -> None:
        """Let go of a connection found broken: the thread's next call opens another."""
        for slot in ("conn", "spare"):
            if getattr(self._local, slot, None) is conn:
                setattr(self._local, slot, None)
        with self._lock, contextlib.suppress(ValueError):
            self._conns.remove(conn)
        conn.close()

    def _fast(self, name: str, params: Mapping[str, Any]) -> list[Any]:
        """Run a hot-path query on this thread's own connection (prepared after a few uses
        unless behind a transaction pooler), within the link's deadline.

        The parameters go positionally and the rows come back as plain tuples, made named
        tuples here by a class kept per query (rebuilt when the column count changes): the
        same rows for less client CPU per call than psycopg's named parameters and
        namedtuple_row, which look the names up again on every call (issue 24)."""
        if name in _PATIENT:
            with translate(self.url), self._using(), self._engine.connect() as sa_conn:
                return list(sa_conn.execute(self._q[name], params).fetchall())
        sql, names = self._pq[name]
        with translate(self.url), self._using():
            conn = self._driver()
            call = None
            try:
                with self._deadlines.bound(conn.fileno()) as call:
                    cur = conn.cursor(row_factory=tuple_row)
                    rows = cur.execute(sql, tuple([params[n] for n in names])).fetchall()
                if not rows:
                    return rows
                make: Any = self._row_types.get(name)
                if make is None or len(make._fields) != len(rows[0]):
                    make = self._row_types[name] = _row_type(name, cur)
                return [make._make(r) for r in rows]
            except psycopg.Error as error:
                if conn.broken or conn.closed:
                    # Reconnect on the next call; the caller retries (StoreUnavailable).
                    self._forget(conn)
                # No answer within the bound, ended by the server's statement_timeout or by the
                # deadline from this side: the database counts as away, as on a lost link.
                if (call is not None and call.ended) or isinstance(
                    error, psycopg.errors.QueryCanceled
                ):
                    shown = masking.mask_url(self.url)
                    raise errors.StoreUnavailable(
                        f"checkpoint database {shown} unreachable: no answer within "
                        f"{self.link.timeout:g} s ({name})",
                        url=shown,
                    ) from error
                raise

    @contextlib.contextmanager
    def transaction(self, *, token: int | None = None) -> Iterator[PgTransaction]:
        """A task's output transaction, on the thread's own connection (the one its claim and
        completion use: one connection per busy thread). The task's own statements take as
        long as they take (TCP keepalives and `tcp_user_timeout` still end a dead link); the
        store's statements in it and the COMMIT or ROLLBACK are bounded like any store call.

        While it is open the thread's calls go to a spare connection: they must commit
        whatever becomes of the task's transaction. A transaction opened inside another (not
        done by the worker) gets a connection of the pool."""
        nested = getattr(self._local, "lent", False)
        engine = self._engine if nested else self._own_engine
        with translate(self.url), self._using(), engine.connect() as conn:
            self._local.lent = True
            try:
                conn = conn.execution_options(isolation_level="READ COMMITTED")
                transaction = conn.begin()
                if not nested and self.link.session_sql(statement_timeout=True) is not None:
                    # The session's statement timeout is for the store's calls; the task's
                    # statements run under the database's own setting, as on a session
                    # without it (the pool's).
                    self.in_transaction(conn, "task_statement_timeout", {})
                yield from self._output(conn, transaction, token)
            finally:
                self._local.lent = nested

    def _output(
        self, conn: sa.Connection, transaction: sa.RootTransaction, token: int | None
    ) -> Iterator[PgTransaction]:
        try:
            if token is not None:
                # Named after the claim for this transaction only, so that a takeover can
                # end it if this process turns zombie (pipeline_fence_v1).
                self.in_transaction(conn, "name_session", {"name": f"pipeline-claim:{token}"})
            yield PgTransaction(conn)
        except BaseException:
            # A link already gone fails the rollback too (SQLAlchemy may refuse it outright
            # on an invalidated connection): the original error is the news.
            if transaction.is_active:
                with (
                    self._bounded(conn, "rollback"),
                    contextlib.suppress(sa_exc.SQLAlchemyError, psycopg.Error),
                ):
                    transaction.rollback()
            raise
        if transaction.is_active:
            with self._bounded(conn, "commit"):
                transaction.commit()

    def in_transaction(self, conn: sa.Connection, name: str, params: Mapping[str, Any]) -> Any:
        """One of the store's statements inside a task's output transaction, bounded."""
        with translate(self.url), self._bounded(conn, name):
            return conn.execute(self._q[name], params)

    @contextlib.contextmanager
    def _bounded(self, conn: sa.Connection, name: str) -> Iterator[None]:
        if conn.invalidated:
            # Its link already gone (a rollback then only ends the transaction locally).
            yield
            return
        driver: psycopg.Connection[Any] = conn.connection.driver_connection  # type: ignore[assignment]
        with self._deadlines.bound(driver.fileno()) as call:
            try:
                yield
            except (sa_exc.DBAPIError, psycopg.Error) as error:
                if not call.ended:
                    raise
                shown = masking.mask_url(self.url)
                raise errors.StoreUnavailable(
                    f"checkpoint database {shown} unreachable: no answer within "
                    f"{self.link.timeout:g} s ({name})",
                    url=shown,
                ) from error

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        """Counts a call or transaction as under way: idle connections are closed only when
        none is."""
        with self._lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                self._last_used = time.monotonic()

    def _close_if_idle(self) -> None:
        """Close every connection if none was used for `idle_seconds` (the deadline watcher
        calls this every tick): an idle worker holds none, or only its sweep's."""
        if self.idle_seconds <= 0:
            return
        with self._lock:
            if self._busy or time.monotonic() - self._last_used < self.idle_seconds:
                return
            conns, self._conns = self._conns, []
            engine = self._sa_engine
            # Under the lock, so no call starts meanwhile; each thread's next call finds its
            # connection closed and opens another.
            for conn in conns:
                with contextlib.suppress(Exception):
                    conn.close()
            if engine is not None and engine.pool.checkedin():  # type: ignore[attr-defined]
                engine.dispose()

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
        for engine in (self._sa_engine, self._sa_direct, self._sa_own):
            if engine is not None:
                engine.dispose(close=False)
        self._deadlines = Deadlines(self.link.deadline, self._close_if_idle)
        self._busy = 0
        with self._lock:
            self._orphans.extend(self._conns)
            self._conns = []
        self._tokens = collections.deque()
        self._tokens_lock = threading.Lock()  # a fork copies a lock in whatever state it was
        self._local = threading.local()

    def close(self) -> None:
        for engine in (self._sa_engine, self._sa_direct, self._sa_own):
            if engine is not None:
                engine.dispose()
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
