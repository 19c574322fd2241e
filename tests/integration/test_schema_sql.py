"""pipeline/store/sql/schema.sql is the live schema: applied to an empty database it builds
what the migration chain builds (tables, columns, constraints, indexes, views, sequences,
functions, triggers)."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from pipeline.store.postgres import PostgresStore, sql_dir

# Each query lists one kind of object of the public schema, in a stable order; the table the
# upgrade keeps for itself is left out (schema.sql has no history of migrations).
CATALOG = {
    "columns": """
        SELECT table_name, column_name, data_type, is_nullable, column_default
          FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name <> 'pipeline_schema_version'
         ORDER BY 1, 2""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
          FROM pg_constraint
         WHERE connamespace = 'public'::regnamespace
           AND conrelid <> coalesce(to_regclass('pipeline_schema_version'), 0)
         ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
         WHERE schemaname = 'public' AND tablename <> 'pipeline_schema_version'
         ORDER BY 1, 2""",
    "views": """
        SELECT viewname, pg_get_viewdef(format('public.%I', viewname)::regclass)
          FROM pg_views WHERE schemaname = 'public' ORDER BY 1""",
    "sequences": """
        SELECT sequence_name, data_type, start_value, increment
          FROM information_schema.sequences WHERE sequence_schema = 'public' ORDER BY 1""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_functiondef(p.oid),
               p.proconfig
          FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1, 2""",
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger
         WHERE NOT tgisinternal ORDER BY 1, 2""",
}


def catalog(url: str) -> dict[str, list[tuple[object, ...]]]:
    dsn = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as conn:
        return {kind: conn.execute(query).fetchall() for kind, query in CATALOG.items()}


@pytest.fixture
def two_empty_databases(fresh_database_url: str) -> Iterator[tuple[str, str]]:
    """Two new databases on the test server, dropped afterwards."""
    other = sa.make_url(fresh_database_url).set(
        database=f"{sa.make_url(fresh_database_url).database}_b"
    )
    admin = (
        sa.make_url(fresh_database_url)
        .set(database="postgres", drivername="postgresql")
        .render_as_string(hide_password=False)
    )
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{other.database}"')
    try:
        yield fresh_database_url, other.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{other.database}" WITH (FORCE)')


def test_schema_sql__builds_what_the_migration_chain_builds(
    two_empty_databases: tuple[str, str],
) -> None:
    migrated_url, from_file_url = two_empty_databases
    migrated = PostgresStore(migrated_url)
    from_file = PostgresStore(from_file_url)
    try:
        migrated.upgrade()
        from_file.execute_script((sql_dir() / "schema.sql").read_text())
    finally:
        migrated.close()
        from_file.close()
    want, got = catalog(migrated_url), catalog(from_file_url)
    assert want["functions"], "the migrations built no function: nothing was compared"
    for kind in CATALOG:
        assert got[kind] == want[kind], f"schema.sql and the migrations differ in {kind}"
