"""A worker's main process imports the store's driver before its pool forks (each pool process
would otherwise import SQLAlchemy and psycopg on its first task: about a second on two cores
with eight at once, bench/bench_fleet.py)."""

from __future__ import annotations

import subprocess
import sys

from tests.support.processes import REPO

CHECK = """
import sys
import pipeline
from celery.signals import worker_init
pipeline.app.loader.import_default_modules()  # as `celery -A pipeline worker` does
before = "pipeline.store.postgres" in sys.modules
worker_init.send(sender=None)
print(before, "pipeline.store.postgres" in sys.modules)
"""


def test_worker_init__imports_the_postgres_store_before_the_pool_forks() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "True"]
