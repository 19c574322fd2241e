"""Shared fixtures: a fresh Postgres database per test session, Redis on our own db number."""

from __future__ import annotations

import os
import pathlib
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

import pipeline
from pipeline import local
from pipeline.sqlstore import PostgresStore

# Redis database numbers the test suite owns (PIPELINE_TEST_REDIS_URL overrides the server).
REDIS_DB = 14


def _server_url(tmp_root: pathlib.Path) -> str:
    """The Postgres server to create test databases on."""
    url = os.environ.get("PIPELINE_TEST_DATABASE_URL")
    if url:
        return url
    if local.port_open("127.0.0.1", 5432):
        return "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    return local.start_postgres(tmp_root)


def _psycopg_dsn(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database created for this test session, with the schema applied; dropped after."""
    server = _server_url(tmp_path_factory.mktemp("pg"))
    name = f"pipeline_test_{uuid.uuid4().hex[:10]}"
    admin = _psycopg_dsn(server)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = sa.make_url(server).set(database=name, drivername="postgresql+psycopg")
    rendered = url.render_as_string(hide_password=False)
    store = PostgresStore(rendered)
    store.upgrade()
    store.close()
    yield rendered
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_store(database_url: str) -> Iterator[PostgresStore]:
    """A store on an empty checkpoint table."""
    store = pipeline.open_store(database_url)
    store.execute_script("TRUNCATE file_checkpoints, file_attempts CASCADE")
    yield store
    store.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Redis URL on the database number the tests own."""
    url = os.environ.get("PIPELINE_TEST_REDIS_URL")
    if url:
        return url
    if local.port_open("127.0.0.1", 6379):
        return f"redis://127.0.0.1:6379/{REDIS_DB}"
    return local.start_redis(tmp_path_factory.mktemp("redis"))
