"""A private PgBouncer (Debian's `pgbouncer`) on a free loopback port, in front of a Postgres.

    with PgBouncer(database_url, mode="transaction") as bouncer:
        store = PostgresStore(bouncer.url(database_url), pooler="transaction")

The configuration is the plain one a team would write (trust auth to a trust server, the
pool mode, a pool size), with nothing the store needs to be told to work: no
`ignore_startup_parameters`, no `max_prepared_statements` (1.18 has none). PgBouncer refuses
to run as root: as root it runs as `postgres` (-u). `available()` says why it cannot run here
(the tests skip with that reason; `.ci/run` installs it).
"""

from __future__ import annotations

import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType

import sqlalchemy as sa

from tests.support.processes import free_port
from tests.support.tcpproxy import TcpProxy, upstream_of, url_via

EXE = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
RUN_AS = "postgres"


def available() -> str | None:
    """None when a PgBouncer can be started here, else why not."""
    if not os.path.exists(EXE):
        return "pgbouncer is not installed (Debian: apt-get install pgbouncer; .ci/run does)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return f"pgbouncer refuses to run as root and there is no {RUN_AS!r} user"
    return None


class PgBouncer:
    """pgbouncer in `mode` (transaction or session) forwarding every database to `upstream`'s
    server."""

    def __init__(self, upstream: str, *, mode: str = "transaction", pool_size: int = 20) -> None:
        parsed = sa.make_url(upstream)
        # a folder (the embedded server's unix socket) or a host: pgbouncer takes either
        self.upstream_host, self.upstream_port = upstream_of(upstream)
        self.user = parsed.username or "postgres"
        self.mode = mode
        self.pool_size = pool_size
        self.port = free_port()
        self.folder = pathlib.Path(tempfile.mkdtemp(prefix="pipeline-pgbouncer-"))
        self.log = self.folder / "pgbouncer.log"
        self._proc: subprocess.Popen[bytes] | None = None
        # The embedded server (the offline pass) listens on a unix socket in a folder of its
        # own user's, which pgbouncer's user may not enter: a TCP proxy of this process's
        # stands between them then.
        self._bridge: TcpProxy | None = None

    def url(self, database_url: str) -> str:
        """`database_url` with its host and port replaced by this PgBouncer's."""
        return url_via(database_url, self.port)

    def start(self) -> PgBouncer:
        host, port = self.upstream_host, self.upstream_port
        if host.startswith("/"):
            self._bridge = TcpProxy(upstream_port=port, upstream_host=host).start()
            host, port = "127.0.0.1", self._bridge.port
        ini = self.folder / "pgbouncer.ini"
        users = self.folder / "userlist.txt"
        users.write_text(f'"{self.user}" ""\n')
        ini.write_text(
            "[databases]\n"
            f"* = host={host} port={port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            f"unix_socket_dir = {self.folder}\n"
            "auth_type = trust\n"
            f"auth_file = {users}\n"
            f"pool_mode = {self.mode}\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 1000\n"
            f"logfile = {self.log}\n"
            "admin_users = postgres\n"
        )
        command = [EXE]
        if os.geteuid() == 0:
            entry = pwd.getpwnam(RUN_AS)
            for path in (self.folder, ini, users):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            command += ["-u", RUN_AS]
        with (self.folder / "stderr.txt").open("wb") as stderr:
            self._proc = subprocess.Popen(
                [*command, str(ini)], stdout=subprocess.DEVNULL, stderr=stderr
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = (self.folder / "stderr.txt").read_text()
                raise RuntimeError(f"pgbouncer exited at start: {err}{self.log_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"pgbouncer did not listen within 10 s: {self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)  # immediate shutdown
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
