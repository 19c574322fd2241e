"""Driver errors translated by SQLSTATE on the real Postgres: only an outage is an outage."""

from __future__ import annotations

import secrets

import pytest
import sqlalchemy as sa

from pipeline import errors
from pipeline.models import Claim
from pipeline.store.postgres import PostgresStore


def test_translate__division_by_zero_is_a_data_error_not_an_outage(pg_store: PostgresStore) -> None:
    with (
        pytest.raises(errors.DataError, match="division by zero") as caught,
        pg_store.transaction() as tx,
    ):
        tx.connection.execute(sa.text("SELECT 1 / 0"))
    assert isinstance(caught.value, errors.PermanentError)
    assert caught.value.data["sqlstate"] == "22012"
    assert not pg_store.unavailable(caught.value.__cause__ or caught.value)


def test_translate__index_row_too_large_is_a_data_error_with_the_databases_message(
    pg_store: PostgresStore,
) -> None:
    pg_store.execute_script("TRUNCATE events")
    huge_type = secrets.token_hex(1600)  # 3,200 incompressible bytes: over the btree limit
    with (
        pytest.raises(errors.DataError, match="index row") as caught,
        pg_store.transaction() as tx,
    ):
        tx.connection.execute(
            sa.text(
                "INSERT INTO events (file_url, line, event_id, ts, type, payload)"
                " VALUES ('file:///x', 1, 'e', now(), :t, '{}')"
            ),
            {"t": huge_type},
        )
    assert caught.value.data["sqlstate"].startswith("54")
    assert pg_store.scalar("SELECT count(*) FROM events") == 0


def test_unavailable__raw_data_error_from_a_task_is_not_an_outage(pg_store: PostgresStore) -> None:
    engine = sa.create_engine(sa.make_url(pg_store.url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as caught:
            conn.execute(sa.text("SELECT CAST('x' AS integer)"))
    finally:
        engine.dispose()
    assert pg_store.unavailable(caught.value) is False


def test_translate__refused_connection_is_unavailable_with_the_password_masked() -> None:
    store = PostgresStore("postgresql://u:S3cret#Pw/x?@127.0.0.1:1/db")
    with pytest.raises(errors.StoreUnavailable) as caught:
        store.summary()
    assert "S3cret" not in str(caught.value)
    assert "unreachable" in str(caught.value)
    assert store.unavailable(caught.value.__cause__ or caught.value)
    store.close()


def test_fail__a_password_in_the_error_message_is_masked_on_the_row(
    pg_store: PostgresStore,
) -> None:
    url = "file:///data/creds-in-error.jsonl"
    pg_store.register([url])
    claim = pg_store.claim(url, "w", 30)
    assert isinstance(claim, Claim)
    pg_store.fail(url, claim.token, RuntimeError("cannot open ftp://u:Sup3rSecret@h/x"))
    row = pg_store.get(url, with_attempts=True)
    assert row is not None
    assert row.error_message is not None
    assert "Sup3rSecret" not in row.error_message
    assert "ftp://u:***@h/x" in row.error_message
    assert all("Sup3rSecret" not in (a.error_message or "") for a in row.attempts)
