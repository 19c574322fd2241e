"""The store's own connections as a SQLAlchemy pool, so a task's output transaction takes the
connection its process's calls use (when it is free) instead of a pool of its own."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import psycopg
import sqlalchemy as sa

from pipeline import errors

if TYPE_CHECKING:
    from pipeline.store.postgres.connection import Connections


class Taken(sa.pool.Pool):
    """A SQLAlchemy pool over the store's own connections (`Connections._take`): a task's
    output transaction takes one of them for its duration, as a call takes one for its own,
    so the connection a claim used is the one the transaction gets when it is free.

    The store owns the connections and closes them; one SQLAlchemy record per connection,
    made the first time it is taken (the dialect's connect hooks run once per connection)."""

    def __init__(self, owner: Connections, **kw: Any) -> None:
        # The "creator" only hands over the connection `_do_get` took for a new record.
        super().__init__(self._make, **kw)  # type: ignore[arg-type]
        self._owner = owner
        self._records: dict[int, tuple[Any, psycopg.Connection[Any]]] = {}
        self._records_lock = threading.Lock()  # threads take and give back at once
        self._making = threading.local()

    def _do_get(self) -> Any:
        conn = self._owner._take()
        try:
            with self._records_lock:
                known = self._records.get(id(conn))
                if known is not None and known[1] is conn:
                    return known[0]
                # Records of connections the store has closed since go (they hold them).
                for key, (_, old) in list(self._records.items()):
                    if old.closed:
                        del self._records[key]
            self._making.conn = conn  # for the creator, which hands it to the new record
            # A new record runs the dialect's setup on the connection (its first in this
            # process: the server's version, isolation level, ...): queries of ours, bounded
            # like any store call, or a silent network holds the task there (issue 21).
            with self._owner.bounded_socket(conn.fileno(), "connect"):
                record = self._create_connection()
            with self._records_lock:
                self._records[id(conn)] = (record, conn)
            return record
        except BaseException:
            self._owner._give_back(conn)
            raise

    def _make(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._making, "conn", None)
        if conn is None:  # SQLAlchemy never reconnects a record here (see `_invalidate`)
            raise errors.PipelineError("no connection taken for a new SQLAlchemy record")
        self._making.conn = None
        return conn

    def _invalidate(
        self, connection: Any, exception: BaseException | None = None, _checkin: bool = True
    ) -> None:
        # A lost link invalidates that connection only. SQLAlchemy's own would mark every
        # connection of the pool made before it for a reconnect at its next checkout; these
        # are the store's, each found broken by its own next use (and closed then).
        if _checkin and getattr(connection, "is_valid", False):
            connection.invalidate(exception)

    def _do_return_conn(self, record: Any) -> None:
        with self._records_lock:
            found = [(k, c) for k, (r, c) in self._records.items() if r is record]
            for key, conn in found:
                if conn.closed:  # closed by SQLAlchemy on a lost link: forgotten
                    del self._records[key]
        for _, conn in found:
            self._owner._give_back(conn)

    def dispose(self) -> None:
        with self._records_lock:
            self._records = {}

    def recreate(self) -> Taken:
        return Taken(
            self._owner,
            recycle=self._recycle,
            echo=self.echo,
            pre_ping=self._pre_ping,
            logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return,
            _dispatch=self.dispatch,
            dialect=self._dialect,
        )

    def status(self) -> str:
        return "the store's own connections"
