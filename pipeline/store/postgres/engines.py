"""The SQLAlchemy engines of a store (bulk reads, tools, migrations), each made on first
use by exactly one thread."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from pipeline.store.postgres.link import Link
from pipeline.store.postgres.sqltext import engine_url


class Engines:
    """What `Connections` makes its SQLAlchemy engines from, and the engines themselves."""

    url: str
    direct_url: str
    link: Link
    _echo: bool
    _pool_size: int
    _engines_lock: threading.Lock
    _sa_engine: sa.Engine | None
    _sa_direct: sa.Engine | None
    _sa_own: sa.Engine | None

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

    def _once(self, attr: str, make: Callable[[], sa.Engine]) -> sa.Engine:
        """The engine in `attr`, made on first use by one thread: two threads' first calls
        would otherwise both make one, and the dropped one's pool keep its connection open."""
        with self._engines_lock:
            if getattr(self, attr) is None:
                setattr(self, attr, make())
            engine: sa.Engine = getattr(self, attr)
        return engine

    @property
    def _engine(self) -> sa.Engine:
        return self._sa_engine or self._once(
            "_sa_engine",
            lambda: self._make_engine(self.url, pool_size=self._pool_size, direct=False),
        )

    @property
    def _session_engine(self) -> sa.Engine:
        """For migrations: on the direct URL when one is given (around the pooler)."""
        if self.direct_url == self.url:
            return self._engine
        return self._sa_direct or self._once(
            "_sa_direct", lambda: self._make_engine(self.direct_url, pool_size=1, direct=True)
        )
