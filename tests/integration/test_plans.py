"""The hot statements look files up by primary key, even after plans were cached on a small table.

The trap (shared/BASELINE.md): psycopg prepares a statement after 5 executions, Postgres then
caches a generic plan, and plpgsql caches the plans of its functions' statements the same way.
A generic plan made while the table was small keeps scanning by status (or the whole table)
as it grows. The store connects with plan_cache_mode=force_custom_plan; these tests warm the
plan caches on a near-empty, freshly analysed table, grow it to 20k rows, and read the plans
actually used (auto_explain, nested statements included) on a store connection. Inside the
claim, complete, fail and abandon functions plans are cached on purpose (migration 0007), so
this is the test that their generic plans stay primary-key lookups.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from pipeline.store import postgres
from pipeline.store.postgres import PostgresStore

ROWS = 20_000
WARM_UP = 12  # > 5 psycopg executions before it prepares + 5 custom plans before a generic one


def test_store_connection__forces_custom_plans_for_its_calls_not_in_output_transactions(
    pg_store: PostgresStore,
) -> None:
    assert pg_store.scalar("SHOW plan_cache_mode") == "force_custom_plan"
    with pg_store.transaction() as tx:
        # A task's statements are planned as the database says (a custom plan per row of an
        # executemany costs backend CPU for nothing); the store's statements in there are
        # functions with plan settings of their own.
        assert tx.connection.execute(sa.text("SHOW plan_cache_mode")).scalar() == "auto"
    assert pg_store.scalar("SHOW plan_cache_mode") == "force_custom_plan"


def _as_the_store_calls(tx: sa.Connection) -> None:
    """An output transaction's connection set back to the store's own calls' plan settings
    (the tests below replay those calls inside a transaction, for auto_explain)."""
    tx.execute(sa.text("SET LOCAL plan_cache_mode = force_custom_plan"))


class Session:
    """The store's statements, run on one store connection, as the store runs them."""

    def __init__(self, connection: sa.Connection) -> None:
        self.connection = connection
        self.queries = postgres.queries()

    def run(self, name: str, **params: Any) -> list[Any]:
        query = self.queries[name]
        # Every parameter the query takes; those not given are NULL (the store's defaults).
        values = dict.fromkeys(query.compile().params)
        values.update(params)
        return list(self.connection.execute(query, values))

    def claim(self, url: str) -> Any:
        (row,) = self.run("claim", file_url=url, worker="w1", lease_seconds=600.0)
        return row

    def expire(self, url: str) -> None:
        self.connection.execute(
            sa.text(
                "UPDATE file_checkpoints SET lease_expires_at = now() - interval '1 second'"
                " WHERE file_url = :u"
            ),
            {"u": url},
        )

    def paths(self, url: str, other: str) -> None:
        """Every path of claim, heartbeat, a chunk, complete and fail, on two existing
        pending rows."""
        claim = self.claim(url)  # pending: take over
        assert claim.outcome == "granted", claim
        assert self.run("heartbeat", file_url=url, token=claim.token)
        assert self.run(
            "commit_chunk",
            file_url=url,
            token=claim.token,
            position='{"offset": 1}',
            total=1,
            filtered=0,
            persisted=1,
        )
        self.expire(url)
        claim = self.claim(url)  # expired: the lost attempt, then take over
        assert claim.outcome == "granted", claim
        (done,) = self.run(
            "complete", file_url=url, token=claim.token, total=1, filtered=0, persisted=1
        )
        assert done.done == []  # applied, no batch: no callback
        assert self.claim(url).outcome == "done"
        claim = self.claim(other)
        assert self.run(
            "fail",
            file_url=other,
            token=claim.token,
            error_class="E",
            error_message="boom",
            retryable=True,
        )
        assert self.claim(other).outcome == "granted"  # failed: the next attempt


def _plans(notices: list[str]) -> list[tuple[str, str]]:
    """(query text, plan) of each auto_explain notice; the plan starts at its first node."""
    found = []
    for notice in notices:
        if "Query Text:" not in notice:
            continue
        lines = notice.split("Query Text:", 1)[1].splitlines()
        first_node = next((i for i, line in enumerate(lines) if "(cost=" in line), len(lines))
        query = " ".join(" ".join(lines[:first_node]).split())
        found.append((query, "\n".join(lines[first_node:])))
    return found


@pytest.fixture
def no_autovacuum(pg_store: PostgresStore) -> Iterator[None]:
    """Keep autovacuum from analysing the table mid-test (an ANALYZE replans everything)."""
    pg_store.execute_script("ALTER TABLE file_checkpoints SET (autovacuum_enabled = off)")
    yield
    pg_store.execute_script("ALTER TABLE file_checkpoints RESET (autovacuum_enabled)")


@pytest.mark.usefixtures("no_autovacuum")
def test_plans__claim_heartbeat_complete_and_fail_use_the_primary_key_at_20k_rows(
    pg_store: PostgresStore,
) -> None:
    warm = [f"file:///warm/{i}" for i in range(2 * WARM_UP)]
    pg_store.register(warm)
    # Statistics that say the table is tiny: a generic plan made now prefers a sequential
    # scan unless the function forbids it (migration 0007; this fails without its
    # enable_seqscan = off).
    pg_store.execute_script("ANALYZE file_checkpoints")
    notices: list[str] = []
    with pg_store.transaction() as tx:
        driver = tx.connection.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        _as_the_store_calls(tx.connection)
        session = Session(tx.connection)
        # Plans cached now are made for a table of a few dozen rows.
        for i in range(WARM_UP):
            session.paths(warm[2 * i], warm[2 * i + 1])
        tx.connection.execute(
            sa.text(
                "INSERT INTO file_checkpoints (file_url, status)"
                " SELECT 'file:///bulk/' || g, 'pending' FROM generate_series(1, :n) g"
            ),
            {"n": ROWS},
        )
        try:
            tx.connection.execute(sa.text("LOAD 'auto_explain'"))
        except sa.exc.DBAPIError as error:  # pragma: no cover - depends on the server
            pytest.skip(f"auto_explain not loadable here: {error.orig}")
        for setting in ("log_min_duration = 0", "log_nested_statements = on", "log_level = notice"):
            tx.connection.execute(sa.text(f"SET LOCAL auto_explain.{setting}"))
        driver.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        for i in range(3):
            session.paths(f"file:///bulk/{100 + 2 * i}", f"file:///bulk/{101 + 2 * i}")

    plans = _plans(notices)
    assert plans, "auto_explain reported no plan"
    on_table = [(q, p) for q, p in plans if " on file_checkpoints" in p]
    seq = [q for q, p in on_table if "Seq Scan on file_checkpoints" in p]
    assert not seq, f"sequential scans at {ROWS} rows: {seq}"
    by_url = [(q, p) for q, p in on_table if re.search(r"\bfile_url = ", q)]
    # The partial index on live claims (WHERE status = 'processing') is as good for a statement
    # that only looks at processing rows: it holds the claims in flight, not the table. Which
    # of the two the planner picks depends on the statistics earlier tests left (PostgreSQL 18
    # picks it for the heartbeat and the fence when they say few rows are processing).
    not_pk = [
        (q, p)
        for q, p in by_url
        if "file_checkpoints_pkey" not in p
        and not ("file_checkpoints_lease_idx" in p and "status = 'processing'" in q)
    ]
    assert not not_pk, f"lookups by file_url not on the primary key: {not_pk}"

    def seen(fragment: str) -> bool:
        return any(fragment in q for q, _ in by_url)

    # The statements that matter were all among them (claim, heartbeat, chunk, complete, fail).
    assert seen("FOR UPDATE"), "claim's row lock"
    assert seen("SET status = 'processing'"), "claim's take-over"
    assert seen("SET lease_expires_at = clock_timestamp() + make_interval"), "heartbeat"
    assert seen("SET status = 'completed'"), "complete"
    assert seen("SET attempt_chunks = c.attempt_chunks"), "a chunk's commit"
    assert seen("SET status = CASE WHEN v_left"), "fail"
