"""How the store's connections reach Postgres: through a pooler or not, and within what time.

No startup `options`: PgBouncer refuses them (1.18: "unsupported startup parameter: options").
What the session needs is set once after connecting, and only where the session is ours (no
pooler, or a pooler in session mode); behind a transaction pooler the statements are never
prepared (a prepared statement lands on another server connection), so each is planned with
its parameters, and the functions carry their own settings (migrations 0007, 0011, 0013).

Every connection is bounded by PIPELINE_DATABASE_TIMEOUT (about a third of the lease): the
connect, TCP keepalives and `tcp_user_timeout` (a peer that vanished without a reset), the
server's `statement_timeout` where the session is ours, and a client-side deadline on every
hot-path call (`Deadlines`), which holds whatever the network and the pooler do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from pipeline import settings

logger = logging.getLogger("pipeline")


@dataclasses.dataclass(frozen=True)
class Link:
    """The connection parameters of one store."""

    pooler: str = "none"  # none | session | transaction (settings.POOLER_MODES)
    timeout: float = 10.0  # seconds

    @classmethod
    def from_settings(cls, pooler: str | None = None, timeout: float | None = None) -> Link:
        return cls(
            pooler=pooler if pooler is not None else settings.DATABASE_POOLER.get(),
            timeout=timeout if timeout is not None else settings.DATABASE_TIMEOUT.get(),
        )

    @property
    def prepare_threshold(self) -> int | None:
        """psycopg's: prepare a statement after 5 uses (its default), never behind a
        transaction pooler."""
        return None if self.pooler == "transaction" else 5

    def connect_args(self) -> dict[str, Any]:
        """libpq parameters: all client-side, none of them a startup parameter a pooler sees."""
        idle = max(1, round(self.timeout / 3))
        return {
            # libpq takes whole seconds, at least 2
            "connect_timeout": max(2, round(self.timeout)),
            "keepalives": 1,
            "keepalives_idle": idle,
            "keepalives_interval": max(1, round(idle / 2)),
            "keepalives_count": 3,
            # data sent and not acknowledged for this long: the connection is dead
            "tcp_user_timeout": max(1000, round(self.timeout * 1000)),
            "application_name": "pipeline",
            "prepare_threshold": self.prepare_threshold,
        }

    def session_sql(self, *, statement_timeout: bool) -> str | None:
        """What a new connection runs first, where the session is ours; None behind a
        transaction pooler (a session setting would stay on a server connection others get).

        Custom plans for every statement: generic plans cached while the table was small
        keep sequential scans as it grows (shared/BASELINE.md); the hot functions choose their
        own (migration 0007). The statement timeout is for the hot path only: an output
        transaction's statements are the task's, and may take as long as it needs.
        """
        if self.pooler == "transaction":
            return None
        sql = "SET plan_cache_mode = force_custom_plan"
        if statement_timeout:
            sql += f"; SET statement_timeout = {round(self.timeout * 1000)}"
        return sql

    @property
    def deadline(self) -> float:
        """How long a hot-path call may take before it is ended from this side: a little
        more than the server's statement timeout, so that one answers first when it can."""
        return self.timeout + min(2.0, self.timeout / 4)


@dataclasses.dataclass
class Call:
    """One call under a deadline; `ended` once the deadline ended it."""

    deadline: float
    fileno: int
    ended: bool = False


class Deadlines:
    """Ends a call that outlives its deadline by shutting its socket down.

    A read on a socket whose peer went silent (a route dropping packets) otherwise waits for
    the kernel, up to about 15 minutes. The shutdown makes the blocked read return at once:
    the driver reports the connection lost, the store raises StoreUnavailable and reconnects
    on the next call. One thread per process, started on first use (and again after a fork);
    it also calls `on_tick` every tick (the store closes its idle connections there).
    """

    def __init__(self, seconds: float, on_tick: Callable[[], None] | None = None) -> None:
        self.seconds = seconds
        self._on_tick = on_tick
        self.ended = 0  # calls ended by a deadline (for tests and logs)
        self._calls: dict[int, Call] = {}
        self._lock = threading.Lock()
        self._pid = 0
        self._next = 0

    @contextlib.contextmanager
    def bound(self, fileno: int) -> Iterator[Call]:
        call = Call(time.monotonic() + self.seconds, fileno)
        with self._lock:
            self._next += 1
            key = self._next
            self._calls[key] = call
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._watch, name="pipeline-deadlines", daemon=True).start()
        try:
            yield call
        finally:
            # Under the lock: once the entry is gone the socket may be closed and its number
            # reused, so the watcher only ever shuts down a socket whose call is still running.
            with self._lock:
                self._calls.pop(key, None)

    def _watch(self) -> None:
        tick = min(0.5, self.seconds / 4)
        pid = os.getpid()
        while pid == self._pid:
            time.sleep(tick)
            now = time.monotonic()
            with self._lock:
                for key, call in list(self._calls.items()):
                    if call.deadline <= now:
                        del self._calls[key]
                        call.ended = True
                        self.ended += 1
                        _shut(call.fileno)
            if self._on_tick is not None:
                try:
                    self._on_tick()
                except Exception:
                    # The thread must outlive a failed chore: dead, it would end no call again.
                    logger.warning("closing idle database connections failed", exc_info=True)


def _shut(fileno: int) -> None:
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=os.dup(fileno))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
