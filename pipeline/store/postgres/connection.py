"""Connections to PostgreSQL: the store's own driver connections, each taken by one call or
one task's output transaction at a time (so a pool process whose task has no transaction open
needs one); a small SQLAlchemy pool for what operators and tools read in bulk and for
migrations; and what a fork must let go of."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections import namedtuple
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row
from sqlalchemy import exc as sa_exc

from pipeline import errors, masking, settings
from pipeline.store.postgres.boundary import no_answer, translate, unavailable
from pipeline.store.postgres.engines import Engines
from pipeline.store.postgres.link import Deadlines, Link
from pipeline.store.postgres.output import PgTransaction
from pipeline.store.postgres.sqltext import engine_url, libpq_url, positional_queries, queries
from pipeline.store.postgres.taken import Taken

# What operators and tools read and write in bulk (status, metrics, submit's registration,
# requeue): its time grows with the table or the input, so it runs without the store calls'
# bound, on a connection without a statement timeout (keepalives and tcp_user_timeout still
# end a dead link). Everything else, the workers' calls, is bounded (link.py).
_PATIENT = frozenset({
    "summary", "activity", "dead", "totals", "running", "ops_state", "ops_batches",
    "ops_attempts", "ops_pickup", "register", "requeue",
})  # fmt: skip


def _row_type(name: str, cursor: psycopg.Cursor[Any]) -> Any:
    """A named tuple class for the rows of query `name`, from the columns of its result."""
    columns = [c.name for c in cursor.description or ()]
    return namedtuple(f"{name}_row", columns, rename=True)


class Connections(Engines):
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
        self._sa_own: sa.Engine | None = None  # output transactions, on the store's own
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
        self._lock = threading.Lock()
        self._engines_lock = threading.Lock()  # `_once`
        self._conns: list[psycopg.Connection[Any]] = []  # every open one, taken or not
        self._idle: list[psycopg.Connection[Any]] = []  # free ones, the last used last
        self._used_at: dict[int, float] = {}  # when each free one was given back
        # Connections inherited over fork: kept referenced, never closed or collected, since
        # closing (or a finaliser) would end the parent's session on the shared socket.
        self._orphans: list[psycopg.Connection[Any]] = []
        self._tokens: collections.deque[int] = collections.deque()
        self._tokens_lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def _own_engine(self) -> sa.Engine:
        """For output transactions: on one of the store's own connections (`taken.Taken`)."""
        return self._sa_own or self._once(
            "_sa_own",
            lambda: sa.create_engine(
                engine_url(self.url),
                pool=Taken(self, reset_on_return="rollback"),
                isolation_level="AUTOCOMMIT",
                echo=self._echo,
            ),
        )

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            # Plain tuples: the hot path names them itself (`_fast`), SQLAlchemy wants tuples.
            self._dsn,
            autocommit=True,
            row_factory=tuple_row,
            **self.link.connect_args(),
        )
        first = self.link.session_sql(statement_timeout=True)
        if first is not None:
            try:
                with self._deadlines.bound(conn.fileno()):
                    conn.execute(first)  # no parameters: several statements allowed
            except BaseException:
                conn.close()
                raise
        with self._lock:
            self._conns.append(conn)
        return conn

    def _take(self) -> psycopg.Connection[Any]:
        """One of the store's connections for a call or an output transaction, for it alone
        until `_give_back`: the one used last if it is free (the others then go unused and
        are closed after `idle_seconds`), else a new one.

        So a pool process uses one connection while its task has no output transaction open
        (the lease keeper's renewals take it between the task's calls), and two while one is:
        a renewal must commit while that transaction is open, which its own session cannot do
        (tests/integration/test_store_connections.py)."""
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
                with contextlib.suppress(ValueError):
                    self._conns.remove(conn)
        return self._connect()

    def _give_back(self, conn: psycopg.Connection[Any]) -> None:
        try:
            usable = (
                not conn.closed
                and not conn.broken
                and conn.info.transaction_status == TransactionStatus.IDLE
            )
            if usable and not conn.autocommit:
                # SQLAlchemy gives an output transaction's connection back in autocommit; a
                # call on one that was not would open a transaction and commit nothing.
                conn.autocommit = True
        except psycopg.Error:
            usable = False
        if not usable:
            # Lost, or left inside a transaction: never handed out again.
            self._forget(conn)
            return
        with self._lock:
            self._used_at[id(conn)] = time.monotonic()
            self._idle.append(conn)

    def _forget(self, conn: psycopg.Connection[Any]) -> None:
        """Let go of a connection found broken: the next call opens another."""
        with self._lock:
            with contextlib.suppress(ValueError):
                self._conns.remove(conn)
            with contextlib.suppress(ValueError):
                self._idle.remove(conn)
            self._used_at.pop(id(conn), None)
        conn.close()

    def _fast(self, name: str, params: Mapping[str, Any]) -> list[Any]:
        """Run a hot-path query on one of the store's own connections (prepared after a few
        uses unless behind a transaction pooler), within the link's deadline.

        The parameters go positionally and the rows come back as plain tuples, made named
        tuples here by a class kept per query (rebuilt when the column count changes): the
        same rows for less client CPU per call than psycopg's named parameters and
        namedtuple_row, which look the names up again on every call (issue 24)."""
        if name in _PATIENT:
            with translate(self.url), self._using(), self._engine.connect() as sa_conn:
                return list(sa_conn.execute(self._q[name], params).fetchall())
        sql, names = self._pq[name]
        with translate(self.url), self._using():
            conn = self._take()
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
                    raise no_answer(self.url, self.link.timeout, name) from error
                raise
            finally:
                self._give_back(conn)

    @contextlib.contextmanager
    def transaction(self, *, token: int | None = None) -> Iterator[PgTransaction]:
        """A task's output transaction, on one of the store's own connections (the one its
        claim used, when free: see `_take`). The task's own statements take as long as they
        take (TCP keepalives and `tcp_user_timeout` still end a dead link); the store's
        statements in it and the COMMIT or ROLLBACK are bounded like any store call. While
        it is open, the calls of its thread and of the lease keeper take another connection:
        they must commit whatever becomes of the task's transaction."""
        with translate(self.url), self._using(), self._own_engine.connect() as conn:
            conn = conn.execution_options(isolation_level="READ COMMITTED")
            transaction = conn.begin()
            yield from self._output(conn, transaction, token)

    def _first(self, conn: sa.Connection, token: int | None) -> None:
        """An output transaction's first statements in one round trip: the database's own
        settings for the task's statements where the session is ours (task_settings), the
        session named after the claim (name_session); the token, an integer, written in."""
        if self.link.session_sql(statement_timeout=True) is None:
            if token is not None:
                self.in_transaction(conn, "name_session", {"name": f"pipeline-claim:{token}"})
            return
        sql = self._q["task_settings"].text
        if token is not None:
            sql += f";\nSELECT set_config('application_name', 'pipeline-claim:{int(token)}', true)"
        with translate(self.url), self._bounded(conn, "task_settings"):
            conn.exec_driver_sql(sql)

    def _output(
        self, conn: sa.Connection, transaction: sa.RootTransaction, token: int | None
    ) -> Iterator[PgTransaction]:
        try:
            self._first(conn, token)
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
        with self.bounded_socket(driver.fileno(), name):
            yield

    @contextlib.contextmanager
    def bounded_socket(self, fileno: int, name: str) -> Iterator[None]:
        """The store's statements on that socket within the deadline: one it ended raises
        StoreUnavailable, "no answer within ... (`name`)"."""
        with self._deadlines.bound(fileno) as call:
            try:
                yield
            except (sa_exc.DBAPIError, psycopg.Error) as error:
                if not call.ended:
                    raise
                raise no_answer(self.url, self.link.timeout, name) from error

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
        """Close the free connections unused for `idle_seconds` (the deadline watcher calls
        this every tick): a busy process keeps only those it goes on using, an idle worker
        none, or only its sweep's. The SQLAlchemy pool goes once the whole store is idle."""
        if self.idle_seconds <= 0:
            return
        now = time.monotonic()
        with self._lock:
            # Under the lock, so none of these is taken meanwhile; the next call opens another.
            stale = [
                c for c in self._idle if now - self._used_at.get(id(c), now) >= self.idle_seconds
            ]
            for conn in stale:
                self._idle.remove(conn)
                self._used_at.pop(id(conn), None)
                with contextlib.suppress(ValueError):
                    self._conns.remove(conn)
            engine = self._sa_engine
            if (
                engine is not None
                and not self._busy
                and now - self._last_used >= self.idle_seconds
                and engine.pool.checkedin()  # type: ignore[attr-defined]
            ):
                # Under the lock: every use of the engine counts as busy (`_using`) from
                # before its checkout, so none has a connection out of the pool closed here
                # (one out would go back to the discarded pool and stay open in it).
                engine.dispose()
        for conn in stale:
            with contextlib.suppress(Exception):
                conn.close()

    def unavailable(self, error: BaseException) -> bool:
        return unavailable(self.url, error)

    def libpq_url(self) -> tuple[str, str | None]:
        return libpq_url(self.url)

    def after_fork(self) -> None:
        # A fork copies locks in whatever state the parent's other threads (the lease keeper,
        # the worker's sweeper) left them: start with fresh ones.
        self._lock, self._engines_lock = threading.Lock(), threading.Lock()
        # Connections opened by the parent must not be shared with it (close=False leaves
        # the parent's sockets alone).
        for engine in (self._sa_engine, self._sa_direct, self._sa_own):
            if engine is not None:
                engine.dispose(close=False)
        self._deadlines = Deadlines(self.link.deadline, self._close_if_idle)
        self._busy = 0
        with self._lock:
            self._orphans.extend(self._conns)
            self._conns, self._idle, self._used_at = [], [], {}
        self._tokens = collections.deque()
        self._tokens_lock = threading.Lock()  # a fork copies a lock in whatever state it was

    def close(self) -> None:
        for engine in (self._sa_engine, self._sa_direct, self._sa_own):
            if engine is not None:
                engine.dispose()
        with self._lock:
            conns, self._conns, self._idle, self._used_at = self._conns, [], [], {}
        for conn in conns:
            conn.close()

    def execute_script(self, sql: str) -> None:
        """Run a multi-statement script (tests and tools)."""
        with translate(self.url), self._using(), self._engine.connect() as conn:
            driver = conn.connection.driver_connection
            assert driver is not None
            driver.execute(sql)

    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        """One value from an ad-hoc query (tests and tools)."""
        with translate(self.url), self._using(), self._engine.connect() as conn:
            return conn.execute(sa.text(sql), dict(params or {})).scalar()
