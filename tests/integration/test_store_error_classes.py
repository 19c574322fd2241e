"""Errors sorted by what they say about the database, with real servers' errors: away or out
of resources (StoreUnavailable, with its cause), configuration wrong (StoreMisconfigured,
naming PIPELINE_DATABASE_URL, password masked), data wrong (DataError)."""

from __future__ import annotations

import os
import pathlib
import pwd
import subprocess
import tempfile
import threading
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

import pipeline
from pipeline import errors
from pipeline.store.postgres import boundary
from tests.support.fakepg import RefusingServer
from tests.support.pgcluster import PgCluster, private_cluster

SECRET = "Pa55-w0rd-x"


def _with(url: str, **parts: str) -> str:
    return sa.make_url(url).set(**parts).render_as_string(hide_password=False)  # type: ignore[arg-type]


def _refusal(url: str) -> BaseException:
    store = pipeline.open_store(url)
    try:
        with pytest.raises(errors.PipelineError) as caught:
            store.get("file:///x")
        return caught.value
    finally:
        store.close()


@pytest.fixture(scope="module")
def small_pg() -> Iterator[PgCluster]:
    """A private cluster with 6 connections in all."""
    with private_cluster(max_connections=6) as pg:
        yield pg


def test_unknown_database__misconfigured_naming_the_setting_password_masked(
    database_url: str,
) -> None:
    url = _with(database_url, database="no_such_db_f25", password=SECRET)
    error = _refusal(url)
    assert isinstance(error, errors.StoreMisconfigured), error
    text = str(error)
    assert text.startswith("PIPELINE_DATABASE_URL ")
    assert 'database "no_such_db_f25" does not exist' in text
    assert SECRET not in text
    assert "***" in text
    assert "\n" not in text
    assert not isinstance(error, errors.StoreUnavailable)


def test_unknown_role__misconfigured(database_url: str) -> None:
    error = _refusal(_with(database_url, username="no_such_role_f25"))
    assert isinstance(error, errors.StoreMisconfigured), error
    assert 'role "no_such_role_f25" does not exist' in str(error)


def test_wrong_password__28P01_misconfigured(small_pg: PgCluster) -> None:
    admin = f"postgresql://postgres@127.0.0.1:{small_pg.port}/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CREATE ROLE pw_user LOGIN PASSWORD 'right-one'")
    hba = small_pg.data / "pg_hba.conf"
    hba.write_text("host all pw_user 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
    url = f"postgresql+psycopg://pw_user:{SECRET}@127.0.0.1:{small_pg.port}/postgres"
    error = _refusal(url)
    assert isinstance(error, errors.StoreMisconfigured), error
    assert 'password authentication failed for user "pw_user"' in str(error)
    assert SECRET not in str(error)


def test_pooler_refusing_a_startup_parameter__misconfigured_at_once() -> None:
    with RefusingServer() as fake:
        error = _refusal(f"postgresql+psycopg://u:{SECRET}@127.0.0.1:{fake.port}/db")
    assert isinstance(error, errors.StoreMisconfigured), error
    assert "unsupported startup parameter" in str(error)
    assert SECRET not in str(error)


def test_connection_refused__unavailable_unreachable() -> None:
    error = _refusal("postgresql+psycopg://u@127.0.0.1:1/db")
    assert isinstance(error, errors.StoreUnavailable)
    assert error.data["cause"] == boundary.UNREACHABLE


def test_too_many_clients__53300_unavailable_then_answers_once_a_slot_frees(
    small_pg: PgCluster,
) -> None:
    admin = f"postgresql://postgres@127.0.0.1:{small_pg.port}/postgres"
    hogs = []
    try:
        with pytest.raises(psycopg.OperationalError):  # noqa: PT012 - fill every slot
            while True:
                hogs.append(psycopg.connect(admin, connect_timeout=5))
        error = _refusal(small_pg.url)
        assert isinstance(error, errors.StoreUnavailable), error
        assert error.data["cause"] == boundary.TOO_MANY_CONNECTIONS
        assert "too many clients" in str(error)
    finally:
        for hog in hogs:
            hog.close()
    # A slot free again: the database answers (this cluster has no schema: SchemaMissing).
    assert isinstance(_refusal(small_pg.url), errors.SchemaMissing)


def test_admin_shutdown_of_the_session__57P01_unavailable(small_pg: PgCluster) -> None:
    store = pipeline.open_store(small_pg.url)
    try:
        with store.transaction() as tx:
            pid = tx.connection.execute(sa.text("SELECT pg_backend_pid()")).scalar()
            with pytest.raises(errors.StoreUnavailable) as caught:  # noqa: PT012
                with psycopg.connect(small_pg.url.replace("+psycopg", ""), autocommit=True) as c:
                    c.execute("SELECT pg_terminate_backend(%s)", [pid])
                tx.connection.execute(sa.text("SELECT 1"))
    except errors.StoreUnavailable as error:  # raised again on the way out of the transaction
        caught_error: BaseException = error
    else:
        caught_error = caught.value
    finally:
        store.close()
    assert caught_error.data["cause"] in (boundary.SHUTTING_DOWN, boundary.UNREACHABLE)


def test_deadlock__40P01_unavailable_not_the_files_failure(small_pg: PgCluster) -> None:
    store = pipeline.open_store(small_pg.url)
    store.execute_script(
        "DROP TABLE IF EXISTS dl; CREATE TABLE dl (id int PRIMARY KEY);"
        " INSERT INTO dl VALUES (1), (2)"
    )
    barrier = threading.Barrier(2)
    caught: list[BaseException] = []

    def lock(first: int, second: int) -> None:
        try:
            with store.transaction() as tx:
                tx.connection.execute(sa.text("UPDATE dl SET id = id WHERE id = :i"), {"i": first})
                barrier.wait(timeout=10)
                tx.connection.execute(sa.text("UPDATE dl SET id = id WHERE id = :i"), {"i": second})
        except BaseException as error:
            caught.append(error)

    threads = [threading.Thread(target=lock, args=ab) for ab in ((1, 2), (2, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    store.close()
    assert len(caught) == 1, caught
    assert isinstance(caught[0], errors.StoreUnavailable), caught[0]
    assert caught[0].data["cause"] == boundary.CONFLICT


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")
def test_disk_full__53100_unavailable_not_the_files_failure(small_pg: PgCluster) -> None:
    space = pathlib.Path(tempfile.mkdtemp(prefix="pipeline-f25-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(space)], check=True)
    store = pipeline.open_store(small_pg.url)
    try:
        owner = pwd.getpwnam(small_pg.user) if small_pg.user else None
        if owner is not None:
            os.chown(space, owner.pw_uid, owner.pw_gid)
        store.execute_script(f"CREATE TABLESPACE small_f25 LOCATION '{space}'")
        store.execute_script("CREATE TABLE filler (b text) TABLESPACE small_f25")
        with pytest.raises(errors.StoreUnavailable) as caught, store.transaction() as tx:  # noqa: PT012
            for _ in range(200):
                tx.connection.execute(
                    sa.text(
                        "INSERT INTO filler SELECT md5(g::text) FROM generate_series(1, 5000) g"
                    )
                )
        assert caught.value.data["cause"] == boundary.DISK_FULL
        assert "No space left on device" in str(caught.value)
    finally:
        store.execute_script("DROP TABLE IF EXISTS filler")
        store.execute_script("DROP TABLESPACE IF EXISTS small_f25")
        store.close()
        subprocess.run(["umount", str(space)], check=False)
        space.rmdir()
