"""The takeover fence (pipeline_fence_v1) ends the zombie's session in its own database only.

Tokens are numbered per database, so two pipeline databases on one server share token numbers:
a session named `pipeline-claim:<token>` in another database is another, live claim.
"""

from __future__ import annotations

import time

import psycopg
import sqlalchemy as sa

from pipeline.store.postgres import PostgresStore


def _dsn(url: str, database: str | None = None) -> str:
    parsed = sa.make_url(url)
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def _ends(conn: psycopg.Connection[tuple[object, ...]], within: float = 10) -> bool:
    """Whether the session behind `conn` is ended within `within` s (the signal lands
    shortly after pg_terminate_backend returns)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return True
        time.sleep(0.05)
    return False


def test_fence__ends_the_claims_session_in_its_database_not_a_same_named_one_elsewhere(
    database_url: str, pg_store: PostgresStore
) -> None:
    token = 987_654_321
    name = f"pipeline-claim:{token}"
    here = psycopg.connect(_dsn(database_url), autocommit=True)
    # Another database on the same server (`postgres` exists on every cluster): a claim there
    # may carry the same token number.
    there = psycopg.connect(_dsn(database_url, "postgres"), autocommit=True)
    try:
        for conn in (here, there):
            conn.execute("SELECT set_config('application_name', %s, false)", (name,))
        assert pg_store.scalar("SELECT pipeline_fence_v1(:t)", {"t": token}) == 1
        assert there.execute("SELECT 1").fetchone() == (1,)  # alive, and stays so
        assert _ends(here), "the claim's session in the fence's database was not ended"
        assert there.execute("SELECT 1").fetchone() == (1,)
    finally:
        here.close()
        there.close()
