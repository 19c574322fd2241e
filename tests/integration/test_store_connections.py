"""How many connections the store holds in a pool process, and why the lease keeper needs a
second one while a task's output transaction is open (issue 21, item 2; the README's
"Running a fleet").

Every call and every output transaction takes one of the store's own connections for itself
(the one used last, when free). One task with its lease keeper thus needs one connection,
except while its output transaction is open: a renewal of the claim's lease must then commit
at once (a takeover reads the lease from another session), which one session cannot do in the
middle of its own transaction, so the renewal, and any call made from inside the task's block,
takes a second one. A connection left unused for PIPELINE_DATABASE_IDLE_SECONDS is closed.
"""

from __future__ import annotations

import gc
import random
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from pipeline.models import Claim
from pipeline.store.postgres import PostgresStore


class _RolledBack(Exception):
    """Raised in the task's block: its transaction rolls back."""


def _backends(store: PostgresStore) -> set[int]:
    """The backends of the store's own open connections."""
    return {c.info.backend_pid for c in store._conns if not c.closed}


def _lease_left(store: PostgresStore, file_url: str) -> float:
    return float(
        store.scalar(
            "SELECT extract(epoch FROM lease_expires_at - now()) FROM file_checkpoints"
            " WHERE file_url = :u",
            {"u": file_url},
        )
    )


def _in_thread(call: object) -> None:
    thread = threading.Thread(target=call)  # type: ignore[arg-type]
    thread.start()
    thread.join(10)


def test_calls_and_renewals_of_another_thread__share_one_connection(
    database_url: str, pg_store: PostgresStore
) -> None:
    store = PostgresStore(database_url, timeout=3.0)
    try:
        claim = store.claim("file:///conn/one", "w", 60)
        assert isinstance(claim, Claim)
        (own,) = _backends(store)
        for _ in range(3):  # the lease keeper's renewals between the task's calls
            _in_thread(lambda: store.heartbeat(claim.file_url, claim.token))
            assert store.get(claim.file_url) is not None
        assert _backends(store) == {own}
    finally:
        store.close()


def test_output_transaction__on_the_claims_connection_without_its_session_settings(
    database_url: str, pg_store: PostgresStore
) -> None:
    store = PostgresStore(database_url, timeout=3.0)
    try:
        claim = store.claim("file:///conn/own", "w", 60)
        assert isinstance(claim, Claim)
        (own,) = _backends(store)
        with store.transaction(token=claim.token) as tx:
            assert tx.execute(sa.text("SELECT pg_backend_pid()")).scalar() == own
            # The store's calls are bounded by the session's timeout; the task's statements
            # run under the database's own (here none), for this transaction only.
            assert tx.execute(sa.text("SHOW statement_timeout")).scalar() == "0"
            # Nor the forced custom plans: a task's executemany is planned once, not per row.
            assert tx.execute(sa.text("SHOW plan_cache_mode")).scalar() == "auto"
            store.complete(claim.file_url, claim.token, claim.stats, transaction=tx)
        # Back to the session's, in autocommit, for the next call on the same connection.
        assert _backends(store) == {own}
        (conn,) = store._conns
        assert conn.autocommit
        assert conn.execute("SHOW statement_timeout").fetchone() == ("3s",)
        assert conn.execute("SHOW plan_cache_mode").fetchone() == ("force_custom_plan",)
        row = store.get(claim.file_url)
        assert row is not None
        assert row.status.value == "completed"
        assert _backends(store) == {own}
    finally:
        store.close()


def test_renewal_during_an_open_output_transaction__commits_at_once_on_a_second_connection(
    database_url: str, pg_store: PostgresStore
) -> None:
    """The floor of two: a renewal made while the task's transaction is open (by the lease
    keeper's thread, or from inside the block) is seen by every other session before that
    transaction ends, and survives its rollback."""
    store = PostgresStore(database_url, timeout=3.0)
    try:
        claim = store.claim("file:///conn/renew", "w", 5)
        assert isinstance(claim, Claim)
        (own,) = _backends(store)
        renewed: list[float | None] = []
        with pytest.raises(_RolledBack), store.transaction(token=claim.token) as tx:  # noqa: PT012
            tx.execute(sa.text("SELECT 1"))
            pg_store.execute_script(
                "UPDATE file_checkpoints SET lease_expires_at = now() + interval '1 second'"
            )
            _in_thread(lambda: renewed.append(store.heartbeat(claim.file_url, claim.token)))
            assert renewed
            assert renewed[0] is not None
            assert _lease_left(pg_store, claim.file_url) > 3.0  # committed, seen outside
            pg_store.execute_script(
                "UPDATE file_checkpoints SET lease_expires_at = now() + interval '1 second'"
            )
            # From inside the block, on this thread: not part of the task's transaction.
            assert store.heartbeat(claim.file_url, claim.token) is not None
            assert _lease_left(pg_store, claim.file_url) > 3.0
            backends = _backends(store)
            assert len(backends) == 2
            assert own in backends
            raise _RolledBack
        assert _lease_left(pg_store, claim.file_url) > 2.0  # the rollback took nothing back
    finally:
        store.close()


def test_second_connection__closed_once_unused_for_the_idle_time_while_the_first_works(
    database_url: str, pg_store: PostgresStore
) -> None:
    store = PostgresStore(database_url, timeout=3.0, idle_seconds=1.0)
    try:
        claim = store.claim("file:///conn/idle", "w", 60)
        assert isinstance(claim, Claim)
        with store.transaction(token=claim.token) as tx:
            tx.execute(sa.text("SELECT 1"))
            _in_thread(lambda: store.heartbeat(claim.file_url, claim.token))
        assert len(_backends(store)) == 2
        # Calls go on, one at a time: they take the connection used last; the other one,
        # unused, is closed after the idle time (by the deadline watcher's tick).
        deadline = time.monotonic() + 10
        while len(_backends(store)) > 1 and time.monotonic() < deadline:
            assert store.heartbeat(claim.file_url, claim.token) is not None
            time.sleep(0.2)
        assert len(_backends(store)) == 1
        assert store.get(claim.file_url) is not None
    finally:
        store.close()


def test_a_connection_lost_in_an_output_transaction__the_others_carry_on(
    database_url: str, pg_store: PostgresStore
) -> None:
    """A link lost under one output transaction ends that connection only: the store's other
    connections still open transactions (SQLAlchemy's pool would recycle them all)."""
    store = PostgresStore(database_url, timeout=3.0)
    try:
        with store.transaction() as outer, store.transaction() as inner:  # two connections
            outer.execute(sa.text("SELECT 1"))
            inner.execute(sa.text("SELECT 1"))
        assert len(_backends(store)) == 2
        with pytest.raises(Exception), store.transaction() as tx:  # noqa: B017, PT011, PT012
            pid = tx.execute(sa.text("SELECT pg_backend_pid()")).scalar()
            pg_store.scalar("SELECT pg_terminate_backend(:p)", {"p": pid})
            tx.execute(sa.text("SELECT 1"))
        assert len(_backends(store)) == 1
        for _ in range(3):
            with store.transaction() as tx:
                assert tx.execute(sa.text("SELECT 2")).scalar() == 2
        assert store.scalar("SELECT 3") == 3
    finally:
        store.close()


def _resource_warnings(run: Callable[[], None]) -> list[str]:
    """The ResourceWarnings (a driver connection dropped while open) during `run` and the
    garbage collection after it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        run()
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_engine__made_once_when_two_threads_first_use_it_at_once(
    database_url: str, pg_store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads' first ad-hoc queries at once: one engine, not one each with the loser's
    pool dropped holding its connection open (garbage collection then warned, at a random
    later moment: a ResourceWarning failing an unrelated test in CI)."""
    made: list[str] = []
    make = PostgresStore._make_engine

    def slow_make(self: PostgresStore, url: str, **kw: Any) -> sa.Engine:
        made.append(threading.current_thread().name)
        time.sleep(0.2)  # both threads are in here at once, unless only one may be
        return make(self, url, **kw)

    monkeypatch.setattr(PostgresStore, "_make_engine", slow_make)
    store = PostgresStore(database_url, timeout=3.0)
    try:

        def first_uses() -> None:
            threads = [threading.Thread(target=lambda: store.scalar("SELECT 1")) for _ in "ab"]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)

        assert _resource_warnings(first_uses) == []
        assert len(made) == 1, made
    finally:
        store.close()


def test_idle_close__never_drops_a_connection_a_query_has_out(
    database_url: str, pg_store: PostgresStore
) -> None:
    """The watcher closes the SQLAlchemy pool of a store idle for `idle_seconds`. Ad-hoc
    queries (`scalar`, `execute_script`: tests, tools; the sweep's prune) count as use like
    any call, and the pool is closed under the lock every use takes first: one closed under a
    query would leave that query's connection in the discarded pool, open until garbage
    collection."""
    store = PostgresStore(database_url, timeout=3.0, idle_seconds=0.3)
    stop = threading.Event()
    failures: list[BaseException] = []

    def query() -> None:
        try:
            while not stop.is_set():
                store.scalar("SELECT pg_sleep(0.02)")
                time.sleep(0.3 * random.random())
        except BaseException as error:
            failures.append(error)

    def queries_then_idle() -> None:
        threads = [threading.Thread(target=query) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(4)
        stop.set()
        for thread in threads:
            thread.join(10)
        # Idle now: the tick closes the pool, once every query gave its connection back.
        deadline = time.monotonic() + 5
        while store._sa_engine.pool.checkedin() and time.monotonic() < deadline:  # type: ignore[union-attr, attr-defined]
            time.sleep(0.1)

    try:
        assert store.get("file:///conn/none") is None  # starts the deadline watcher
        assert _resource_warnings(queries_then_idle) == []
        assert failures == []
        assert store._sa_engine is not None
        assert store._sa_engine.pool.checkedin() == 0  # type: ignore[attr-defined]
        assert store.scalar("SELECT 4") == 4  # and the next query opens one again
    finally:
        stop.set()
        store.close()
