"""Migration 0006 upgrades a database in use: claims made before it end with one attempt row, and
workers not yet upgraded (calling the older function names) keep the guarantees."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.rows import namedtuple_row

import pipeline
from pipeline.models import Claim, Outcome, Status
from pipeline.store import postgres


def _dsn(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _apply_up_to(url: str, version: int) -> None:
    """The migrations up to `version`, as `pipeline db upgrade` of that release applied them."""
    with psycopg.connect(_dsn(url)) as conn:
        conn.execute(
            "CREATE TABLE pipeline_schema_version (version integer PRIMARY KEY,"
            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for number, name, script in postgres.migrations():
            if number <= version:
                conn.execute(script)  # type: ignore[arg-type]
                conn.execute(
                    "INSERT INTO pipeline_schema_version (version, name) VALUES (%s, %s)",
                    (number, name),
                )


def _old_claim(conn: psycopg.Connection[Any], url: str, lease: float = 600.0) -> Any:
    """A claim as a worker of the previous release makes it (pipeline_claim_v2)."""
    row = conn.execute(
        "SELECT * FROM pipeline_claim_v2(%s, 'old:1', %s, NULL, NULL, 't', 'id-1')", (url, lease)
    ).fetchone()
    assert row is not None
    assert row.outcome == "granted", row
    return row


def _history(conn: psycopg.Connection[Any], url: str) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT attempt, token, outcome FROM file_attempts WHERE file_url = %s ORDER BY token",
        (url,),
    ).fetchall()


def test_upgrade__claims_made_before_0006_end_with_one_attempt_row_each(
    fresh_database_url: str,
) -> None:
    _apply_up_to(fresh_database_url, 5)
    done, failed, lost = (f"file:///upgrade/{n}" for n in ("done", "failed", "lost"))
    with psycopg.connect(
        _dsn(fresh_database_url), autocommit=True, row_factory=namedtuple_row
    ) as conn:
        old = {u: _old_claim(conn, u) for u in (done, failed)}
        old[lost] = _old_claim(conn, lost, lease=0.05)
        # The previous release wrote the running attempt at the claim.
        assert conn.execute("SELECT count(*) FROM file_attempts").fetchone()[0] == 3  # type: ignore[index]

        store = pipeline.open_store(fresh_database_url)
        try:
            assert store.upgrade()[0] == "0006_cheaper_checkpoint"
            # In use across the upgrade: the new functions end the old claims' rows in place.
            store.complete(done, old[done].token, {"total": 1, "filtered": 0, "persisted": 1})
            assert store.fail(failed, old[failed].token, "boom", retry_in=None).status is (
                Status.FAILED
            )
            time.sleep(0.2)
            assert [w.file_url for w in store.reap(waiting_seconds=None)] == [lost]
            for url, outcome in ((done, "completed"), (failed, "failed"), (lost, "lost")):
                assert _history(conn, url) == [(1, old[url].token, outcome)], url
                row = store.get(url, with_attempts=True)
                assert row is not None
                assert [(a.token, a.outcome) for a in row.attempts] == [
                    (old[url].token, Outcome(outcome))
                ]
        finally:
            store.close()


def test_upgrade__older_function_names_keep_their_guarantees(pg_store: Any) -> None:
    url, other = "file:///upgrade/old-worker", "file:///upgrade/not-due"
    with psycopg.connect(_dsn(pg_store.url), autocommit=True, row_factory=namedtuple_row) as conn:
        claim = _old_claim(conn, url)
        # A second claimant is refused while the lease is live (G1), through the old name too.
        busy = conn.execute(
            "SELECT * FROM pipeline_claim_v2(%s, 'old:2', 600, NULL, NULL, 't', 'id-2')", (url,)
        ).fetchone()
        assert busy is not None
        assert busy.outcome == "busy"
        # Fenced: a stale token completes nothing.
        stale = conn.execute(
            "SELECT pipeline_complete_v1(%s, %s, 1, 0, 1, NULL, NULL)", (url, claim.token + 999)
        ).fetchone()
        assert stale is not None
        assert stale[0] is False
        ok = conn.execute(
            "SELECT pipeline_complete_v1(%s, %s, 1, 0, 1, NULL, NULL)", (url, claim.token)
        ).fetchone()
        assert ok is not None
        assert ok[0] is True
        assert _history(conn, url) == [(1, claim.token, "completed")]

        # A failed row before its retry is due: v2 says not_due, v1 (which knew no such
        # outcome) says busy, and neither starts an attempt.
        first = pg_store.claim(other, "new:1")
        assert isinstance(first, Claim)
        pg_store.fail(other, first.token, "boom", retry_in=600)
        for name, expected in (("pipeline_claim_v2", "not_due"), ("pipeline_claim_v1", "busy")):
            row = conn.execute(
                f"SELECT * FROM {name}(%s, 'old:3', 600, NULL, NULL, 't', 'id-3')", (other,)
            ).fetchone()
            assert row is not None
            assert row.outcome == expected, name
        checkpoint = pg_store.get(other)
        assert checkpoint is not None
        assert (checkpoint.status, checkpoint.attempt) == (Status.FAILED, 1)
