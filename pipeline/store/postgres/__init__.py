"""The PostgreSQL store: the only modules that talk to the database driver (psycopg, and
SQLAlchemy for output transactions and migrations); the SQL itself is under `sql/`."""

from pipeline.store.postgres.output import PgTransaction, copy_rows, execute_many
from pipeline.store.postgres.sqltext import (
    driver_queries,
    engine_url,
    libpq_url,
    migrations,
    queries,
    sql_dir,
)
from pipeline.store.postgres.store import PostgresStore

__all__ = [
    "PgTransaction",
    "PostgresStore",
    "copy_rows",
    "driver_queries",
    "engine_url",
    "execute_many",
    "libpq_url",
    "migrations",
    "queries",
    "sql_dir",
]
