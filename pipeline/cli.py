"""The `pipeline` command line."""

from __future__ import annotations

import sys
from typing import Any

import click

from pipeline import config, errors


def _store(database_url: str | None) -> Any:
    import pipeline

    url = database_url or config.database_url()
    if not url:
        raise click.UsageError(f"set {config.DATABASE_URL_ENV} or pass --database-url")
    return pipeline.open_store(url)


database_option = click.option(
    "--database-url",
    envvar=config.DATABASE_URL_ENV,
    help=f"SQLAlchemy URL of the checkpoint database [env {config.DATABASE_URL_ENV}]",
)


@click.group()
def main() -> None:
    """Exactly-once file processing on Celery and PostgreSQL."""


@main.group()
def db() -> None:
    """The checkpoint schema."""


@db.command("upgrade")
@database_option
def db_upgrade(database_url: str | None) -> None:
    """Apply the schema migrations not yet applied (idempotent, safe to run concurrently)."""
    store = _store(database_url)
    try:
        applied = store.upgrade()
        version = store.schema_version()
    except errors.PipelineError as error:
        raise click.ClickException(str(error)) from error
    finally:
        store.close()
    where = store.masked_url
    if applied:
        click.echo(f"applied {', '.join(applied)} to {where}; schema version {version}")
    else:
        click.echo(f"{where} is up to date; schema version {version}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
