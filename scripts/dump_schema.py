"""Write pipeline/store/sql/schema.sql: the live schema, as the migration chain leaves it.

Run `make schema` after adding a migration. It applies every migration to a new database on
PIPELINE_DATABASE_URL's server (default: the one on 127.0.0.1:5432), dumps the schema with
pg_dump (which must be of that server's version or newer), and drops the database again.
tests/integration/test_schema_sql.py checks that the file and the chain agree.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid

import psycopg
import sqlalchemy as sa

from pipeline.store.postgres import PostgresStore, sql_dir

HEADER = """\
-- The live schema: what the migrations under migrations/ leave in a database, in one file
-- to read. Written by `make schema` (scripts/dump_schema.py) with pg_dump; do not edit it by
-- hand: add a migration, then run `make schema`. tests/integration/test_schema_sql.py checks
-- that this file and the migration chain build the same tables, indexes, constraints,
-- views and functions. `pipeline db upgrade` applies the migrations, not this file.

-- Functions may call functions defined further down.
SET check_function_bodies = false;
"""


def main() -> None:
    server = sa.make_url(
        os.environ.get("PIPELINE_DATABASE_URL")
        or "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    name = f"pipeline_schema_{uuid.uuid4().hex[:8]}"
    admin = server.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = server.set(database=name)
        store = PostgresStore(url.render_as_string(hide_password=False))
        store.upgrade()
        store.close()
        target = url.set(drivername="postgresql").render_as_string(hide_password=False)
        dump = subprocess.run(
            [
                "pg_dump",
                "--schema-only",
                "--no-owner",
                "--no-privileges",
                "--no-comments",
                "--exclude-table=pipeline_schema_version",
                target,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    (sql_dir() / "schema.sql").write_text(HEADER + clean(dump))


def clean(dump: str) -> str:
    """pg_dump's text without its session settings, psql meta-commands and name comments."""
    kept = []
    for line in dump.splitlines():
        if line.startswith(("SET ", "\\", "--")) or line.startswith("SELECT pg_catalog.set_config"):
            continue
        kept.append(line)
    text = "\n".join(kept)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


if __name__ == "__main__":
    main()
