"""A silent network or a database that does not answer never hangs a store call (issue 21).

Every call is bounded by PIPELINE_DATABASE_TIMEOUT (here 2 s): past it the database counts
as away, StoreUnavailable, which the execution waits out in place; the next call after the
path is back reconnects by itself. The black hole is tests/support/tcpproxy.py's: bytes stop
in both directions and no socket is closed, as when a route drops packets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from pipeline import errors
from pipeline.models import Claim, Stats
from pipeline.store.postgres import PostgresStore
from tests.support.tcpproxy import TcpProxy, upstream_of, url_via

TIMEOUT = 2.0
# What "within the bound" means here: the deadline (timeout + a quarter) plus the watcher's
# tick and a loaded machine's slack; without a bound the call waits for the kernel (minutes).
BOUND = TIMEOUT * 3
LOCKED = "file:///lock/a"


def _url_via(database_url: str, port: int) -> str:
    return url_via(database_url, port)


@pytest.fixture(params=["direct", "pgbouncer"])
def via(request: pytest.FixtureRequest, database_url: str) -> Iterator[tuple[str, str]]:
    """(the URL the store is given, pooler mode): straight to Postgres, or through a PgBouncer
    in transaction mode."""
    if request.param == "pgbouncer":
        yield request.getfixturevalue("bouncer").url(database_url), "transaction"
    else:
        yield database_url, "none"


def _timed(call: object) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        call()  # type: ignore[operator]
    except BaseException as error:
        return error, time.monotonic() - started
    return None, time.monotonic() - started


def test_blackhole__calls_and_connects_end_unavailable_within_the_bound_then_recover(
    pg_store: PostgresStore, via: tuple[str, str]
) -> None:
    url, pooler = via
    host, port = upstream_of(url)
    with TcpProxy(upstream_port=port, upstream_host=host) as proxy:
        store = PostgresStore(_url_via(url, proxy.port), pooler=pooler, timeout=TIMEOUT)
        try:
            assert isinstance(store.claim("file:///bh/a", "w", 60), Claim)
            proxy.blackhole()

            # A call on the open connection: its request is never answered.
            error, took = _timed(lambda: store.heartbeat("file:///bh/a", 1))
            assert isinstance(error, errors.StoreUnavailable), error
            assert "no answer within 2 s" in str(error)
            assert took < BOUND, took
            print(f"\n[blackhole {pooler}] call on an open connection: unavailable in {took:.2f} s")

            # The next call opens a new connection, which the black hole accepts and never
            # answers: connect_timeout ends it.
            error, took = _timed(lambda: store.get("file:///bh/a"))
            assert isinstance(error, errors.StoreUnavailable), error
            assert took < BOUND, took
            print(f"[blackhole {pooler}] a new connection: unavailable in {took:.2f} s")

            # The path comes back: the store reconnects by itself, the claim is still there.
            proxy.unblock()
            row = store.get("file:///bh/a")
            assert row is not None
            assert row.status.value == "processing"
        finally:
            proxy.unblock()
            store.close()


def test_row_lock_held_past_the_bound__claim_ends_unavailable_and_the_holder_is_untouched(
    pg_store: PostgresStore, database_url: str, via: tuple[str, str]
) -> None:
    """The server does answer, but the statement waits (a lock held by a stuck session): the
    statement timeout (no pooler) or the deadline (behind the pooler) ends the wait."""
    url, pooler = via
    assert isinstance(pg_store.claim(LOCKED, "w", 60), Claim)
    store = PostgresStore(url, pooler=pooler, timeout=TIMEOUT)
    dsn = (
        sa.make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    holder = psycopg.connect(dsn)
    try:
        holder.execute(
            "SELECT 1 FROM file_checkpoints WHERE file_url = 'file:///lock/a' FOR UPDATE"
        )
        store.get(LOCKED)  # connected, so the bound is the statement's
        error, took = _timed(lambda: store.claim(LOCKED, "w2", 60))
        assert isinstance(error, errors.StoreUnavailable), error
        assert "no answer within 2 s" in str(error)
        assert took < BOUND, took
        print(f"\n[lock wait {pooler}] claim: unavailable in {took:.2f} s")
        # The holder's transaction is not disturbed, and the store works once the lock goes.
        assert holder.execute("SELECT 1").fetchone() == (1,)
        holder.rollback()
        assert store.get(LOCKED) is not None
    finally:
        holder.close()
        store.close()


def test_blackhole_as_a_process_opens_its_first_output_transaction__it_ends_within_the_bound(
    pg_store: PostgresStore, database_url: str
) -> None:
    """A process's first output transaction on a connection has SQLAlchemy set it up: the
    dialect's first queries (server version, isolation level, ...) on the store's connection.
    Those are the store's too: bounded, not left to the kernel (a worker's pool process sat
    there through a whole black hole)."""
    claim = pg_store.claim("file:///bh/first", "w", 60)
    assert isinstance(claim, Claim)
    host, port = upstream_of(database_url)
    with TcpProxy(upstream_port=port, upstream_host=host) as proxy:
        store = PostgresStore(_url_via(database_url, proxy.port), timeout=TIMEOUT)
        # Without the bound the setup waits until the path is back: here after BOUND * 3.
        back = threading.Timer(BOUND * 3, proxy.unblock)
        try:
            assert store.get(claim.file_url) is not None  # connected, no transaction yet
            proxy.blackhole()
            back.start()

            def first_transaction() -> None:
                with store.transaction(token=claim.token) as tx:
                    tx.execute(sa.text("SELECT 1"))

            error, took = _timed(first_transaction)
            assert isinstance(error, errors.StoreUnavailable), (error, took)
            assert "no answer within 2 s (connect)" in str(error)
            assert took < BOUND, took
            print(f"\n[blackhole] setup of a first output transaction: unavailable in {took:.2f} s")
            # The path back, the next one connects and sets up again, by itself.
            proxy.unblock()
            with store.transaction(token=claim.token) as tx:
                assert tx.execute(sa.text("SELECT 1")).scalar() == 1
        finally:
            back.cancel()
            proxy.unblock()
            store.close()


@pytest.mark.parametrize("where", ["complete", "commit"])
def test_blackhole_in_the_output_transaction__it_ends_unavailable_within_the_bound(
    pg_store: PostgresStore, database_url: str, where: str
) -> None:
    """The store's statements in a task's output transaction and its COMMIT are bounded too;
    what the commit did is the database's to say once it answers (here: nothing)."""
    pg_store.execute_script("CREATE TABLE IF NOT EXISTS timeouts_sink (n integer)")
    pg_store.execute_script("TRUNCATE timeouts_sink")
    claim = pg_store.claim("file:///bh/commit", "w", 60)
    assert isinstance(claim, Claim)
    host, port = upstream_of(database_url)
    with TcpProxy(upstream_port=port, upstream_host=host) as proxy:
        store = PostgresStore(_url_via(database_url, proxy.port), timeout=TIMEOUT)
        started = 0.0
        try:
            with (  # noqa: PT012
                pytest.raises(errors.StoreUnavailable, match="no answer within 2 s"),
                store.transaction(token=claim.token) as tx,
            ):
                tx.execute(sa.text("INSERT INTO timeouts_sink VALUES (1)"))
                if where == "complete":
                    proxy.blackhole()
                    started = time.monotonic()
                store.complete(claim.file_url, claim.token, Stats(1, 0, 1), transaction=tx)
                if where == "commit":
                    proxy.blackhole()
                    started = time.monotonic()
            took = time.monotonic() - started
            assert took < BOUND, took
            print(f"\n[blackhole] {where} in an output transaction: unavailable in {took:.2f} s")
            # The path never comes back for that link: what the proxy held (the COMMIT) is
            # dropped with it. (Delivered late instead, it would commit: the execution asks
            # the database which it was once it answers.)
            proxy.cut()
        finally:
            proxy.unblock()
            store.close()
    # The COMMIT never reached the server: the session ended, its transaction rolled back,
    # the file still processing under the same claim.
    wait = time.monotonic() + 10
    while (
        pg_store.scalar(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = :n",
            {"n": f"pipeline-claim:{claim.token}"},
        )
        and time.monotonic() < wait
    ):
        time.sleep(0.1)
    assert pg_store.scalar("SELECT count(*) FROM timeouts_sink") == 0
    row = pg_store.get(claim.file_url)
    assert row is not None
    assert (row.status.value, row.token) == ("processing", claim.token)
