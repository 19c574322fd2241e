"""A worker's main process imports the store's driver before its pool forks (each pool process
would otherwise import SQLAlchemy and psycopg on its first task: about a second on two cores
with eight at once, bench/bench_fleet.py), and SQLAlchemy's PostgreSQL dialect, which each
pool process's first output transaction would load (about 120 M instructions, an eighth of a
10,000-line file's task, bench/profile_race.py), and compiles the store's queries."""

from __future__ import annotations

import subprocess
import sys

from tests.support.processes import REPO

CHECK = """
import sys
import pipeline
from celery.signals import worker_init
pipeline.app.loader.import_default_modules()  # as `celery -A pipeline worker` does
WARM = ("pipeline.store.postgres", "sqlalchemy.dialects.postgresql.psycopg")
before = [name in sys.modules for name in WARM]
worker_init.send(sender=None)
from pipeline.store.postgres import sqltext
compiled = sqltext.positional_queries.cache_info().currsize
print(*before, *(name in sys.modules for name in WARM), compiled)
"""


def test_worker_init__imports_the_postgres_store_before_the_pool_forks() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "False", "True", "True", "1"]
