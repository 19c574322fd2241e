"""The tasks the task-overhead benchmark drains: all on pipeline's app and settings."""

from __future__ import annotations

import json
import os
import urllib.parse
from typing import Any

import sqlalchemy as sa
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


# -- the fair race (bench_tasks.py, rows "... load N lines"): a small piece of real work -------
# Read a JSON Lines file, write its rows with INSERT ... ON CONFLICT DO NOTHING on a unique key:
# by hand (what a user writes without us), and through @checkpointed + checkpoint.transaction().
# Both use the same SQLAlchemy statement and executemany on the same database.

RACE_TABLE = "bench_race_rows"
RACE_DDL = (
    f"CREATE TABLE IF NOT EXISTS {RACE_TABLE} (file_url text NOT NULL, line integer NOT NULL,"
    " value bigint, name text, PRIMARY KEY (file_url, line))"
)
_RACE_INSERT = sa.text(
    f"INSERT INTO {RACE_TABLE} (file_url, line, value, name) VALUES (:url, :line, :value, :name)"
    " ON CONFLICT (file_url, line) DO NOTHING"
)
_engine: sa.Engine | None = None


def _race_rows(file_url: str) -> list[dict[str, object]]:
    """The file's rows (`file:///path#run`: the fragment only makes the URL unique per run)."""
    path = urllib.parse.urlsplit(file_url).path
    with open(path, encoding="utf-8") as f:
        return [
            {"url": file_url, "line": n, "value": r["value"], "name": r["name"]}
            for n, r in enumerate(map(json.loads, f), start=1)
        ]


def _race_engine() -> sa.Engine:
    """The hand-written task's engine: one per pool process, created after the fork."""
    global _engine
    if _engine is None:
        url = os.environ["PIPELINE_DATABASE_URL"]
        _engine = sa.create_engine(url, pool_size=1)
    return _engine


@app.task(name="bench.raw_load")
def raw_load(file_url: str) -> dict[str, int]:
    """By hand: the rows in one transaction, duplicates ignored on the unique key."""
    rows = _race_rows(file_url)
    with _race_engine().begin() as conn:
        conn.execute(_RACE_INSERT, rows)
    return {"total": len(rows), "filtered": 0, "persisted": len(rows)}


@checkpointed(name="bench.checkpointed_load")
def ckpt_load(file_url: str, *, checkpoint: Any) -> dict[str, int]:
    """The same work, its rows committed with the file's `completed` mark."""
    rows = _race_rows(file_url)
    with checkpoint.transaction() as out:
        out.execute(_RACE_INSERT, rows)
    return {"total": len(rows), "filtered": 0, "persisted": len(rows)}
