"""The task of the fleet benchmark (bench_fleet.py): a file that sleeps, and the time from the
pool process taking the message to the task's body starting, which is the claim.

Each body start appends one line to a file of its process in PIPELINE_BENCH_FLEET_DIR:
`<seconds from task_prerun to the body> <file_url>`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery.signals import task_prerun

from pipeline import app, checkpointed

__all__ = ["app", "fleet"]

_OUT = os.environ.get("PIPELINE_BENCH_FLEET_DIR", "/tmp")
_SLEEP = float(os.environ.get("PIPELINE_BENCH_FLEET_SLEEP", "1.0"))
_started: dict[str, float] = {}


@task_prerun.connect
def _prerun(task_id: str | None = None, **_: Any) -> None:
    if task_id is not None:
        _started[task_id] = time.perf_counter()


@checkpointed(name="bench.fleet", lease_seconds=30)
def fleet(file_url: str, *, checkpoint: Any) -> None:
    """Claimed (before this body runs), then asleep, then completed."""
    begun = _started.pop(fleet.request.id, None)
    if begun is not None:
        claim = time.perf_counter() - begun
        with open(os.path.join(_OUT, f"claims-{os.getpid()}.txt"), "a") as handle:
            handle.write(f"{claim:.6f} {file_url}\n")
    time.sleep(_SLEEP)
