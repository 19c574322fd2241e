"""The PostgreSQL store: the one module that executes SQL.

Every transition is one statement or one plpgsql function call (see sql/), so the database
decides, under the row's lock and on its own clock; nothing is read here and written back.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib.resources
import json
import pathlib
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.rows import namedtuple_row
from sqlalchemy import exc as sa_exc

from pipeline import errors, masking
from pipeline.models import (
    Attempt,
    Change,
    Checkpoint,
    Claim,
    ClaimResult,
    DeadFile,
    FailResult,
    Outcome,
    Overview,
    Reason,
    Refusal,
    Registration,
    Stats,
    Status,
    Work,
)
from pipeline.store import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_OVERDUE_SECONDS,
    DEFAULT_WAITING_SECONDS,
    TOKEN_BLOCK,
    error_text,
    requeue_statuses,
    resume_tokens,
    split_registrations,
)

# Taken for the whole of `db upgrade`, so concurrent upgrades run one after another.
_MIGRATION_LOCK_KEY = 0x70697065  # "pipe"
_QUERY_HEADER = re.compile(r"^-- ([a-z_]+) --\s*$", re.MULTILINE)
# SQLSTATEs that mean "the server is not reachable or went away" (connection exception,
# admin/crash shutdown, cannot connect now) and "too many connections" (wait for a slot).
# Nothing else is an outage: a data error retried in a loop would never succeed.
_UNAVAILABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")
# Data exception, integrity constraint violation, program limit exceeded (e.g. "index row
# size exceeds maximum"): the data is at fault, not the database.
_DATA_SQLSTATES = ("22", "23", "54")
_MISSING_SQLSTATES = ("42P01", "42883")  # undefined table, undefined function


def sql_dir() -> pathlib.Path:
    """Where the .sql files are: the `sql` folder beside this module, in the source tree and
    in the installed package alike."""
    return pathlib.Path(str(importlib.resources.files("pipeline.store") / "sql"))


@functools.cache
def queries() -> dict[str, sa.TextClause]:
    """The named queries of pipeline/store/sql/queries.sql, compiled once."""
    text = (sql_dir() / "queries.sql").read_text()
    found: dict[str, sa.TextClause] = {}
    blocks = _QUERY_HEADER.split(text)
    for name, body in zip(blocks[1::2], blocks[2::2], strict=True):
        lines = [ln for ln in body.strip().splitlines() if not ln.startswith("--")]
        found[name] = sa.text("\n".join(lines))
    return found


# `:name` parameters (not `::type` casts) in psycopg's `%(name)s` style.
_PARAM = re.compile(r"(?<![:\w]):([a-z_]+)\b")


@functools.cache
def driver_queries() -> dict[str, str]:
    """The named queries for psycopg itself (the hot path skips SQLAlchemy's layers)."""
    return {name: _PARAM.sub(r"%(\1)s", clause.text) for name, clause in queries().items()}


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration, in order."""
    result = []
    for path in sorted((sql_dir() / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql")):
        result.append((int(path.name[:4]), path.stem, path.read_text()))
    return result


def engine_url(url: str) -> sa.URL:
    """A SQLAlchemy URL on the psycopg 3 driver, whatever Postgres spelling was given."""
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgres", "postgresql", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def libpq_url(url: str) -> tuple[str, str | None]:
    """The URL as libpq tools (psql) read it, without its password; and the password."""
    parsed = sa.make_url(url)
    password = parsed.password
    plain = parsed.set(drivername="postgresql", password=None)
    return plain.render_as_string(hide_password=False), (
        None if password is None else str(password)
    )


@contextlib.contextmanager
def translate(url: str) -> Iterator[None]:
    """Turn driver errors into the project's own, at this one boundary, by SQLSTATE."""
    try:
        yield
    except (sa_exc.DBAPIError, psycopg.Error) as error:
        orig = error.orig if isinstance(error, sa_exc.DBAPIError) else error
        state = str(getattr(orig, "sqlstate", "") or "")
        shown = masking.mask_url(url)
        message = masking.scrub(_first_line(orig), url)
        if _is_unavailable(error, orig, state):
            raise errors.StoreUnavailable(
                f"checkpoint database {shown} unreachable: {message}", url=shown
            ) from error
        if state.startswith(_DATA_SQLSTATES):
            raise errors.DataError(
                f"the database refused the data ({state}): {message}", sqlstate=state
            ) from error
        if state in _MISSING_SQLSTATES:
            raise errors.SchemaMissing(
                f"checkpoint schema missing in {shown}: run `pipeline db upgrade` ({message})"
            ) from error
        raise


def _is_unavailable(error: BaseException, orig: BaseException | None, state: str) -> bool:
    if state:
        return state.startswith(_UNAVAILABLE_SQLSTATES)
    # No SQLSTATE: the server never answered (connection refused, timeout, closed socket).
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError)


def _first_line(error: BaseException | None) -> str:
    return (str(error) or type(error).__name__).strip().splitlines()[0] if error else ""


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


def _granted(file_url: str, lease: float, row: Any) -> ClaimResult:
    return Claim(
        file_url=file_url,
        token=row.token,
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        lease_seconds=lease,
        generation=row.generation,
    )


def _done(file_url: str, lease: float, row: Any) -> ClaimResult:
    stats = Stats(row.records_total, row.records_filtered, row.records_persisted)
    return Refusal(file_url, Reason.DONE, stats=stats)


def _busy(file_url: str, lease: float, row: Any) -> ClaimResult:
    return Refusal(file_url, Reason.BUSY, retry_in=max(float(row.retry_in), 0.0))


def _not_due(file_url: str, lease: float, row: Any) -> ClaimResult:
    retry_in = max(float(row.retry_in), 0.0)
    return Refusal(file_url, Reason.NOT_DUE, retry_in=retry_in, error=row.error_message)


def _dead(file_url: str, lease: float, row: Any) -> ClaimResult:
    return Refusal(file_url, Reason.DEAD, error=row.error_message)


# What pipeline_claim answers, and the result each outcome becomes; anything else raises.
_CLAIM_OUTCOMES: dict[str, Callable[[str, float, Any], ClaimResult]] = {
    "granted": _granted,
    "done": _done,
    "busy": _busy,
    "not_due": _not_due,
    "dead": _dead,
}

_STATUSES: dict[str, Status] = {s.value: s for s in Status}
_CHANGES: dict[str, Change] = {c.value: c for c in Change}


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


class PostgresStore:
    """The checkpoint store on PostgreSQL."""

    def __init__(self, database_url: str, *, pool_size: int = 2, echo: bool = False) -> None:
        self.url = database_url
        self._pool_size = pool_size
        self._echo = echo
        # Created on first use: only output transactions and migrations need SQLAlchemy, and
        # its dialect costs a short-lived CLI command (`pipeline status`) more than its query.
        self._sa_engine: sa.Engine | None = None
        self._q = queries()
        self._dq = driver_queries()
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
        """Run a hot-path query on this thread's own connection (prepared after a few uses)."""
        with translate(self.url):
            conn = self._driver()
            try:
                return conn.execute(self._dq[name], params).fetchall()
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
                    # Name the session after the claim for this transaction only, so that a
                    # takeover can end it if this process turns zombie (pipeline_fence_v1).
                    conn.execute(
                        sa.text("SELECT set_config('application_name', :name, true)"),
                        {"name": f"pipeline-claim:{token}"},
                    )
                yield PgTransaction(conn)

    def unavailable(self, error: BaseException) -> bool:
        """Whether an exception (from a task's own use of a transaction) means the database
        could not be reached."""
        try:
            with translate(self.url):
                raise error
        except errors.StoreUnavailable:
            return True
        except BaseException:
            return False

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

    # -- schema -----------------------------------------------------------------------------

    def upgrade(self) -> list[str]:
        """Apply the migrations not yet applied; safe to run from several processes at once."""
        applied_now: list[str] = []
        with translate(self.url), self._engine.connect() as conn:
            conn = conn.execution_options(isolation_level="READ COMMITTED")
            with conn.begin():
                conn.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY}
                )
                conn.execute(
                    sa.text(
                        "CREATE TABLE IF NOT EXISTS pipeline_schema_version ("
                        " version integer PRIMARY KEY, name text NOT NULL,"
                        " applied_at timestamptz NOT NULL DEFAULT now())"
                    )
                )
                done = set(
                    conn.execute(sa.text("SELECT version FROM pipeline_schema_version")).scalars()
                )
                driver = conn.connection.driver_connection
                assert driver is not None
                for version, name, script in migrations():
                    if version in done:
                        continue
                    driver.execute(script)  # no parameters: several statements allowed
                    conn.execute(
                        sa.text(
                            "INSERT INTO pipeline_schema_version (version, name) VALUES (:v, :n)"
                        ),
                        {"v": version, "n": name},
                    )
                    applied_now.append(name)
        return applied_now

    def schema_version(self) -> int | None:
        with translate(self.url), self._engine.connect() as conn:
            exists = conn.execute(
                sa.text("SELECT to_regclass('pipeline_schema_version') IS NOT NULL")
            ).scalar()
            if not exists:
                return None
            return conn.execute(
                sa.text("SELECT max(version) FROM pipeline_schema_version")
            ).scalar()

    # -- transitions ------------------------------------------------------------------------

    def claim(
        self,
        file_url: str,
        worker_id: str,
        lease_seconds: float | None = None,
        *,
        max_attempts: int | None = None,
        file_type: str | None = None,
        task_name: str | None = None,
        task_id: str | None = None,
        resume_token: int | Sequence[int] | None = None,
        token: int | None = None,
    ) -> ClaimResult:
        lease = float(lease_seconds or DEFAULT_LEASE_SECONDS)
        (row,) = self._fast(
            "claim",
            {
                "file_url": file_url,
                "worker": worker_id,
                "lease_seconds": lease,
                "max_attempts": max_attempts,
                "file_type": file_type,
                "task_name": task_name,
                "task_id": task_id,
                "resume_tokens": resume_tokens(resume_token),
                "token": token,
            },
        )
        build = _CLAIM_OUTCOMES.get(row.outcome)
        if build is None:
            # A function newer than this code answered: failing loudly beats guessing (a
            # guess of "dead" would kill the file).
            raise errors.PipelineError(
                f"unknown claim outcome {row.outcome!r} for {file_url}: is the code older than "
                "the schema?"
            )
        return build(file_url, lease, row)

    def reserve_token(self) -> int:
        # Taken from the sequence a block at a time (one query per TOKEN_BLOCK claims); unused
        # ones are only gaps in the sequence. Cleared after fork: two processes must never
        # propose the same token.
        with self._tokens_lock:  # not self._lock: _fast may take that one to connect
            if not self._tokens:
                rows = self._fast("reserve_tokens", {"n": TOKEN_BLOCK})
                self._tokens.extend(int(r.token) for r in rows)
            return self._tokens.popleft()

    def heartbeat(self, file_url: str, token: int) -> float | None:
        rows = self._fast("heartbeat", {"file_url": file_url, "token": token})
        return float(rows[0].lease_left) if rows else None

    def complete(
        self,
        file_url: str,
        token: int,
        stats: Stats | Mapping[str, Any] | None = None,
        *,
        processing_time_ms: int | None = None,
        details: Mapping[str, Any] | None = None,
        transaction: Any = None,
    ) -> None:
        s = Stats.coerce(stats)
        params = {
            "file_url": file_url,
            "token": token,
            "total": s.total,
            "filtered": s.filtered,
            "persisted": s.persisted,
            "processing_time_ms": processing_time_ms,
            "details": json.dumps(details) if details is not None else None,
        }
        if transaction is not None:
            with translate(self.url):
                ok = transaction.connection.execute(self._q["complete"], params).scalar()
        else:
            ok = self._fast("complete", params)[0].ok
        if not ok:
            raise errors.LostClaim.of(file_url, token, "completion not applied")

    def fail(
        self,
        file_url: str,
        token: int,
        error: BaseException | str,
        *,
        retryable: bool = True,
        retry_in: float | None = None,
    ) -> FailResult:
        error_class, message = error_text(error)
        rows = self._fast(
            "fail",
            {
                "file_url": file_url,
                "token": token,
                "error_class": error_class,
                "error_message": message,
                "retryable": retryable,
                "retry_in": retry_in,
            },
        )
        if not rows:
            raise errors.LostClaim.of(file_url, token, "failure not recorded")
        row = rows[0]
        status = Status(row.status)
        return FailResult(
            status,
            row.attempt,
            row.max_attempts,
            retry_in=float(row.retry_in) if row.retry_in is not None else None,
        )

    def abandon(self, file_url: str, worker_id: str, task_id: str | None) -> Status | None:
        rows = self._fast(
            "abandon", {"file_url": file_url, "worker": worker_id, "task_id": task_id}
        )
        return Status(rows[0].status) if rows else None

    def get(self, file_url: str, *, with_attempts: bool = False) -> Checkpoint | None:
        rows = self._fast("get", {"file_url": file_url})
        if not rows:
            return None
        data = rows[0]._asdict()
        data["status"] = Status(data["status"])
        attempts: tuple[Attempt, ...] = ()
        if with_attempts:
            attempts = tuple(
                Attempt(**{**r._asdict(), "outcome": Outcome(r.outcome)})
                for r in self._fast("attempts", {"file_url": file_url})
            )
        return Checkpoint(**data, attempts=attempts)

    def register(
        self,
        urls: Iterable[str | tuple[str, str | None]],
        *,
        batch_id: str | None = None,
        file_type: str = "unknown",
        task_name: str | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        changes_only: bool = False,
    ) -> list[Registration]:
        pairs = list(split_registrations(urls))
        if not pairs:
            return []
        rows = self._fast(
            "register",
            {
                "urls": [u for u, _ in pairs],
                "fingerprints": [f for _, f in pairs],
                "batch_id": batch_id,
                "file_type": file_type,
                "task_name": task_name,
                "max_attempts": max_attempts,
                "changes_only": changes_only,
            },
        )
        # Plain dict lookups: Enum calls cost a second per 100,000 rows a watch registers.
        return [
            Registration(
                r.file_url, _STATUSES[r.status], bool(r.needs_task), r.task_name, _CHANGES[r.change]
            )
            for r in rows
        ]

    def requeue(
        self,
        file_url: str | None = None,
        *,
        batch_id: str | None = None,
        statuses: Sequence[Status] | None = None,
        force: bool = False,
    ) -> list[Work]:
        rows = self._fast(
            "requeue",
            {
                "file_url": file_url,
                "batch_id": batch_id,
                "statuses": [str(s) for s in requeue_statuses(statuses, force)],
                "force": force,
            },
        )
        return [Work(r.file_url, r.task_name, Status(r.status)) for r in rows]

    def reap(
        self,
        *,
        waiting_seconds: float | None = DEFAULT_WAITING_SECONDS,
        limit: int = 1000,
        overdue_seconds: float = DEFAULT_OVERDUE_SECONDS,
    ) -> list[Work]:
        waiting = None if waiting_seconds is None else float(waiting_seconds)
        rows = self._fast(
            "reap",
            {"waiting_seconds": waiting, "limit": limit, "overdue_seconds": overdue_seconds},
        )
        return [Work(r.file_url, r.task_name, Status(r.status)) for r in rows]

    def summary(self, batch_id: str | None = None) -> dict[str | None, dict[Status, int]]:
        result: dict[str | None, dict[Status, int]] = {}
        for r in self._fast("summary", {"batch_id": batch_id}):
            result.setdefault(r.batch_id, {})[Status(r.status)] = int(r.n)
        return result

    def overview(self, batch_id: str | None = None, *, dead_limit: int = 10) -> Overview:
        (act,) = self._fast("activity", {"batch_id": batch_id})
        dead = tuple(
            DeadFile(r.file_url, r.error_message, r.updated_at, r.attempt)
            for r in self._fast("dead", {"batch_id": batch_id, "limit": dead_limit})
        )
        records = None
        seconds = None
        if batch_id is not None:
            (t,) = self._fast("totals", {"batch_id": batch_id})
            records = Stats(int(t.total), int(t.filtered), int(t.persisted))
            seconds = None if t.seconds is None else float(t.seconds)
        age = (
            (act.db_now - act.oldest_live_start).total_seconds()
            if act.oldest_live_start is not None
            else None
        )
        return Overview(
            counts=self.summary(batch_id),
            completed_last_minute=int(act.completed_last_minute),
            oldest_live_lease_age=age,
            expired_leases=int(act.expired_leases),
            dead=dead,
            records=records,
            batch_seconds=seconds,
        )

    def attempt_outcomes(self) -> dict[str, int]:
        """Executions by outcome (running, completed, failed, lost)."""
        return {r.outcome: int(r.n) for r in self._fast("attempt_outcomes", {})}
