"""How many connections a thread of the store holds, and why the lease keeper needs its own
(issue 21, item 2; the README's "Running a fleet").

A thread's calls and the output transaction of the task it runs share one connection. While
that transaction is open, a renewal of the claim's lease must commit at once (a takeover
reads the lease from another session), which one session cannot do in the middle of its own
transaction: the lease keeper's renewals, and any call made from inside the task's block, go
through another connection. Hence two per busy pool process, and not one.
"""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from pipeline.models import Claim
from pipeline.store.postgres import PostgresStore


class _RolledBack(Exception):
    """Raised in the task's block: its transaction rolls back."""


def _backend(store: PostgresStore) -> int:
    """The backend of the calling thread's own connection (the one its calls use)."""
    conn = store._current()
    assert conn is not None
    return int(conn.info.backend_pid)


def _lease_left(store: PostgresStore, file_url: str) -> float:
    return float(
        store.scalar(
            "SELECT extract(epoch FROM lease_expires_at - now()) FROM file_checkpoints"
            " WHERE file_url = :u",
            {"u": file_url},
        )
    )


def test_output_transaction__on_the_threads_own_connection_without_its_statement_timeout(
    database_url: str, pg_store: PostgresStore
) -> None:
    store = PostgresStore(database_url, timeout=3.0)
    try:
        claim = store.claim("file:///conn/own", "w", 60)
        assert isinstance(claim, Claim)
        own = _backend(store)
        with store.transaction(token=claim.token) as tx:
            assert tx.execute(sa.text("SELECT pg_backend_pid()")).scalar() == own
            # The store's calls are bounded by the session's timeout; the task's statements
            # run under the database's own (here none), for this transaction only.
            assert tx.execute(sa.text("SHOW statement_timeout")).scalar() == "0"
            store.complete(claim.file_url, claim.token, claim.stats, transaction=tx)
        # Back to the session's, on the same connection, for the next call.
        assert _backend(store) == own
        assert store.scalar("SELECT 1") == 1
        conn = store._current()
        assert conn is not None
        assert conn.execute("SHOW statement_timeout").fetchone() == ("3s",)
        row = store.get(claim.file_url)
        assert row is not None
        assert row.status.value == "completed"
    finally:
        store.close()


def test_renewal_during_an_open_output_transaction__commits_at_once_on_another_connection(
    database_url: str, pg_store: PostgresStore
) -> None:
    """The floor of two: a renewal made while the task's transaction is open (by the lease
    keeper's thread, or from inside the block) is seen by every other session before that
    transaction ends, and survives its rollback."""
    store = PostgresStore(database_url, timeout=3.0)
    try:
        claim = store.claim("file:///conn/renew", "w", 5)
        assert isinstance(claim, Claim)
        own = _backend(store)
        backends: list[int] = []

        def keeper() -> None:
            assert store.heartbeat(claim.file_url, claim.token) is not None
            backends.append(_backend(store))

        with pytest.raises(_RolledBack), store.transaction(token=claim.token) as tx:  # noqa: PT012
            tx.execute(sa.text("SELECT 1"))
            # The lease now ends in at most 5 s; renewed to 5 s from now by each heartbeat.
            pg_store.execute_script(
                "UPDATE file_checkpoints SET lease_expires_at = now() + interval '1 second'"
            )
            thread = threading.Thread(target=keeper)
            thread.start()
            thread.join(10)
            assert _lease_left(pg_store, claim.file_url) > 3.0  # committed, seen outside
            pg_store.execute_script(
                "UPDATE file_checkpoints SET lease_expires_at = now() + interval '1 second'"
            )
            # From inside the block, on this thread: not part of the task's transaction.
            assert store.heartbeat(claim.file_url, claim.token) is not None
            assert _lease_left(pg_store, claim.file_url) > 3.0
            spare = store._driver()
            assert spare.info.backend_pid != own
            raise _RolledBack
        assert backends
        assert backends[0] != own
        assert _lease_left(pg_store, claim.file_url) > 2.0  # the rollback took nothing back
    finally:
        store.close()
