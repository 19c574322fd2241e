"""The task of the fair-sharing benchmark (bench_fair.py): a file that is claimed, sleeps
PIPELINE_BENCH_FAIR_SLEEP seconds (its work), and is completed.

Each claim refused because its batch is at its concurrency limit appends its time (epoch
seconds) to a file of its process in PIPELINE_BENCH_FAIR_DIR, if set: a Celery retry before
migration 0023, a task returning "held by the batch's limit" since.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery.signals import task_retry, task_success

from pipeline import app, checkpointed

__all__ = ["app", "fair"]

_SLEEP = float(os.environ.get("PIPELINE_BENCH_FAIR_SLEEP", "0.02"))
_OUT = os.environ.get("PIPELINE_BENCH_FAIR_DIR")


def _write_down() -> None:
    if _OUT is not None:
        with open(os.path.join(_OUT, f"refused-{os.getpid()}.txt"), "a") as handle:
            handle.write(f"{time.time():.3f}\n")


@task_retry.connect
def _retried(reason: Any = None, **_: Any) -> None:
    if "concurrency limit" in str(reason):
        _write_down()


@task_success.connect
def _held(result: Any = None, **_: Any) -> None:
    if isinstance(result, dict) and result.get("reason") == "held by the batch's limit":
        _write_down()


@checkpointed(name="bench.fair", lease_seconds=30)
def fair(file_url: str) -> None:
    """Claimed (before this body runs), asleep, then completed."""
    time.sleep(_SLEEP)
