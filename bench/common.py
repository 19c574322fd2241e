"""Shared plumbing for the benchmarks: services, fresh databases, A/B rounds, tables."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
PG_SERVER = os.environ.get("PIPELINE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
# The benchmarks' own Redis database number; flushed by them, used by nothing else.
REDIS_URL = os.environ.get("PIPELINE_BENCH_REDIS", "redis://127.0.0.1:6379/11")


def header(title: str) -> str:
    """The machine and versions, printed above every table."""
    import celery
    import kombu
    import sqlalchemy

    with psycopg.connect(PG_SERVER) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    import redis

    info = redis.Redis.from_url(REDIS_URL).info("server")
    return (
        f"## {title}\n\n"
        f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}: {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, celery {celery.__version__}, kombu "
        f"{kombu.__version__}, SQLAlchemy {sqlalchemy.__version__}, psycopg "
        f"{psycopg.__version__}, PostgreSQL {pg}, Redis {info['redis_version']}\n"
    )


@contextlib.contextmanager
def fresh_database(prefix: str = "pipeline_bench") -> Iterator[str]:
    """A new database with the schema applied; dropped afterwards. Yields its SQLAlchemy URL."""
    import pipeline

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_SERVER, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_SERVER.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name
    try:
        store = pipeline.open_store(url)
        store.upgrade()
        store.close()
        yield url
    finally:
        with psycopg.connect(PG_SERVER, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def fresh_database_at(root: pathlib.Path, prefix: str = "pipeline_bench_before") -> Iterator[str]:
    """As fresh_database, with the schema of the source tree at `root` (another version of this
    project, e.g. `git archive` of an earlier commit), applied by that tree's own code."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_SERVER, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_SERVER.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name
    try:
        subprocess.run(
            [sys.executable, "-c", f"import pipeline; pipeline.open_store({url!r}).upgrade()"],
            env={**os.environ, "PYTHONPATH": str(root)},
            cwd=root,
            check=True,
        )
        yield url
    finally:
        with psycopg.connect(PG_SERVER, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def flush_redis() -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    return f"{median(values):,.0f} [{min(values):,.0f}..{max(values):,.0f}]"


def interleave(sides: dict[str, Callable[[int], float]], rounds: int) -> dict[str, list[float]]:
    """Run each side once per round, in turn (A B C A B C ...), so drift hits all alike."""
    results: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name, run in sides.items():
            value = run(r)
            results[name].append(value)
            print(f"  round {r + 1}/{rounds} {name}: {value:,.1f}", file=sys.stderr, flush=True)
    return results


def table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def save(name: str, markdown: str, data: dict[str, Any]) -> None:
    """Print the section and keep it (with its raw figures) for RESULTS.md."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.md").write_text(markdown)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    print(markdown, flush=True)


def env_for(database_url: str, queue: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PIPELINE_DATABASE_URL=database_url,
        PIPELINE_BROKER_URL=REDIS_URL,
        PIPELINE_QUEUE=queue,
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


def start_worker(
    app_module: str,
    queue: str,
    env: dict[str, str],
    *extra: str,
    name: str | None = None,
    cwd: pathlib.Path | str = ROOT,
) -> subprocess.Popen[bytes]:
    node = name or f"bench-{uuid.uuid4().hex[:6]}@%h"
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app_module,
        "worker",
        "-Q",
        queue,
        "-n",
        node,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-l",
        "warning",
        *extra,
    ]
    return subprocess.Popen(
        cmd,
        env=env,
        # `python -m` puts the working folder first on sys.path: the code under test
        cwd=cwd,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_ready(app: Any, count: int = 1, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=0.5) or []
        if len(replies) >= count:
            return [next(iter(r)) for r in replies]
    raise RuntimeError("worker did not come up")


def stop(proc: subprocess.Popen[bytes]) -> None:
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# -- helpers added for the store / submit / scale / recovery benchmarks ---------------------------


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL (postgresql+psycopg://...) as plain libpq / psycopg wants it."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def pg_cli_args(url: str) -> list[str]:
    """-h/-p/-U and the database name, for pgbench and friends."""
    import urllib.parse

    parts = urllib.parse.urlsplit(libpq_url(url))
    args = ["-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 5432)]
    if parts.username:
        args += ["-U", parts.username]
    return [*args, parts.path.lstrip("/")]


def pipeline_executable() -> str:
    """The real `pipeline` console script of this venv."""
    import shutil

    beside = pathlib.Path(sys.executable).parent / "pipeline"
    found = str(beside) if beside.exists() else shutil.which("pipeline")
    if not found:
        raise RuntimeError("the `pipeline` console script is not installed (make install)")
    return found


def timed_run(
    cmd: list[str], env: dict[str, str] | None = None, *, check: bool = True
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall seconds of a subprocess, and its result (output captured)."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    took = time.perf_counter() - started
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:3])} ... exited {proc.returncode}:\n{proc.stdout[-2000:]}"
            f"\n{proc.stderr[-2000:]}"
        )
    return took, proc


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def queue_length(queue: str) -> int:
    import redis

    return int(redis.Redis.from_url(REDIS_URL).llen(queue))


def ms(seconds: float, digits: int = 0) -> str:
    return f"{seconds * 1000:,.{digits}f} ms"


def ms_spread(values: list[float]) -> str:
    """Median [min..max] of durations given in seconds, shown in milliseconds."""
    return f"{median(values) * 1000:,.0f} [{min(values) * 1000:,.0f}..{max(values) * 1000:,.0f}] ms"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"
