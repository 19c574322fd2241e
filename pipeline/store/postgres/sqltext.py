"""The SQL of the store, loaded by name from `sql/`; and the spellings of a database URL."""

from __future__ import annotations

import functools
import importlib.resources
import pathlib
import re

import sqlalchemy as sa

from pipeline import sqlfile


def sql_dir() -> pathlib.Path:
    """Where the .sql files are: the `sql` folder of the store package, in the source tree
    and in the installed package alike."""
    return pathlib.Path(str(importlib.resources.files("pipeline.store") / "sql"))


@functools.cache
def queries() -> dict[str, sa.TextClause]:
    """The named queries of pipeline/store/sql/queries.sql, compiled once."""
    blocks = sqlfile.named_blocks(sql_dir() / "queries.sql")
    return {name: sa.text(sql) for name, sql in blocks.items()}


# `:name` parameters (not `::type` casts) in psycopg's `%(name)s` style.
_PARAM = re.compile(r"(?<![:\w]):([a-z_]+)\b")


@functools.cache
def driver_queries() -> dict[str, str]:
    """The named queries for psycopg itself (the hot path skips SQLAlchemy's layers)."""
    return {name: _PARAM.sub(r"%(\1)s", clause.text) for name, clause in queries().items()}


@functools.cache
def positional_queries() -> dict[str, tuple[str, tuple[str, ...]]]:
    """The named queries for psycopg with positional `%s` parameters, and the names in the
    order they take: a tuple is passed as it is, where a dict of names is matched and
    reordered by psycopg on every call (the hot path's claim and complete, issue 24)."""
    result = {}
    for name, clause in queries().items():
        names = tuple(_PARAM.findall(clause.text))
        result[name] = (_PARAM.sub("%s", clause.text.replace("%", "%%")), names)
    return result


def warm() -> None:
    """What each pool process would otherwise do on its first task, done once in the worker's
    main process before the pool forks (`pipeline.store.preload`): import SQLAlchemy's
    PostgreSQL dialect for psycopg, which the first output transaction's engine loads (the
    bulk of a pool process's first checkpointed task beyond its later ones: bench/
    profile_race.py), and read and compile the store's queries."""
    import sqlalchemy.dialects.postgresql.psycopg  # noqa: F401

    positional_queries()


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration, in order."""
    result = []
    for path in sorted((sql_dir() / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql")):
        result.append((int(path.name[:4]), path.stem, path.read_text()))
    return result


def engine_url(url: str) -> sa.URL:
    """A SQLAlchemy URL on the psycopg 3 driver, whatever Postgres spelling was given."""
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgres", "postgresql", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def libpq_url(url: str) -> tuple[str, str | None]:
    """The URL as libpq tools (psql) read it, without its password; and the password."""
    parsed = sa.make_url(url)
    password = parsed.password
    plain = parsed.set(drivername="postgresql", password=None)
    return plain.render_as_string(hide_password=False), (
        None if password is None else str(password)
    )
