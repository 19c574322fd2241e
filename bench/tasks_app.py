"""The tasks the task-overhead benchmark drains: all on pipeline's app and settings."""

from __future__ import annotations

import os

from celery_once import QueueOnce

from pipeline import app, checkpointed

app.conf.ONCE = {
    "backend": "celery_once.backends.Redis",
    "settings": {"url": os.environ.get("PIPELINE_BROKER_URL"), "default_timeout": 3600},
}


@app.task(name="bench.raw")
def raw(file_url: str) -> None:
    """A plain Celery no-op with the project's settings."""


@checkpointed(name="bench.checkpointed")
def ckpt(file_url: str) -> None:
    """The same no-op, claimed and completed through the checkpoint."""


@app.task(name="bench.once", base=QueueOnce, once={"graceful": True})
def once(file_url: str) -> None:
    """The same no-op under celery-once's Redis lock."""
