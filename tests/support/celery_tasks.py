"""Checkpointed tasks for the Celery tests; the URL's query string says how each behaves.

`tests.chunked` works in chunks instead: `?chunks=N` chunks of `?sleep=S` seconds each, one
sink row per chunk (its `line` is the chunk's number), resuming after the last committed
chunk; `?kill_before=1` SIGKILLs its process before its first chunk.

`?sleep=S` sleeps S seconds inside the output transaction (with `&sleep_until=N`, only on
attempts before N), `?raise=1` raises a retryable error, `?permanent=1` a non-retryable one,
`?kill=1` SIGKILLs its own process, `?dataerror=1` runs a statement the database
refuses as data (division by zero) inside the output transaction, `?fill=N` inserts N rows
into a table `sink_fill` the test creates (output that needs new pages: a full disk refuses
it), `?raise_until=N` raises on attempts before N. Every execution writes one row to `sink`
through `checkpoint.transaction()`, so counting sink rows counts the effects that landed.

`tests.outside` writes nothing to the database itself: it sleeps `?sleep=S` seconds and
completes (no output transaction).

`tests.batch_done` is a batch's completion callback: it writes one row to `callback_runs` (no
unique key) with the batch summary, through `checkpoint.transaction()`, sleeping
TESTS_CALLBACK_SLEEP seconds inside it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import urllib.parse
from typing import Any

import sqlalchemy as sa
from celery.exceptions import SoftTimeLimitExceeded

from pipeline import Stats, app, batch_summary, checkpointed, errors

# `celery -A tests.support.celery_tasks worker` finds the app under this name.
__all__ = [
    "CALLBACK_DDL",
    "SINK_DDL",
    "Boom",
    "app",
    "backoff",
    "batch_done",
    "chunked",
    "limited",
    "outside",
    "plain",
    "sink",
]

logger = logging.getLogger("tests.sink")

LEASE = float(os.environ.get("PIPELINE_TEST_LEASE") or 30)

SINK_DDL = """
CREATE TABLE IF NOT EXISTS sink (
    id bigserial PRIMARY KEY,
    file_url text NOT NULL,
    token bigint NOT NULL,
    attempt integer NOT NULL,
    pid integer NOT NULL,
    line integer,
    inserted_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


CALLBACK_DDL = """
CREATE TABLE IF NOT EXISTS callback_runs (
    file_url text NOT NULL,
    summary jsonb,
    pid integer NOT NULL,
    inserted_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


class Boom(RuntimeError):
    """A retryable failure raised on purpose."""


def _options(file_url: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(file_url).query))


@checkpointed(name="tests.sink", file_type="test", lease_seconds=LEASE, backoff=0.2, backoff_max=1)
def sink(file_url: str, *, checkpoint: Any) -> dict[str, int]:
    return _sink(file_url, checkpoint)


@checkpointed(name="tests.backoff", file_type="test", lease_seconds=LEASE, backoff=8, backoff_max=8)
def backoff(file_url: str, *, checkpoint: Any) -> dict[str, int]:
    """`tests.sink` with a backoff of 4-8 s between attempts."""
    return _sink(file_url, checkpoint)


@checkpointed(
    name="tests.limited",
    file_type="test",
    lease_seconds=LEASE,
    backoff=0.2,
    backoff_max=1,
    soft_time_limit=1.5,
    time_limit=4,
)
def limited(file_url: str, *, checkpoint: Any) -> dict[str, int]:
    """`tests.sink` under time limits; `?hang=1` ignores the soft one (a stuck read)."""
    if _options(file_url).get("hang"):
        try:
            time.sleep(60)
        except SoftTimeLimitExceeded:
            time.sleep(60)  # only the hard limit ends this
    return _sink(file_url, checkpoint)


def _sink(file_url: str, checkpoint: Any) -> dict[str, int]:
    # One line per start of the function, so tests can count starts per attempt.
    logger.warning(
        "SINK-START %s attempt=%s token=%s", file_url, checkpoint.attempt, checkpoint.token
    )
    opts = _options(file_url)
    if opts.get("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    if opts.get("permanent"):
        raise errors.PermanentError(f"cannot process {file_url}")
    if opts.get("raise") or checkpoint.attempt < int(opts.get("raise_until", 0)):
        raise Boom(f"boom on attempt {checkpoint.attempt}")
    with checkpoint.transaction() as conn:
        conn.execute(
            sa.text("INSERT INTO sink (file_url, token, attempt, pid) VALUES (:u, :t, :a, :p)"),
            {"u": file_url, "t": checkpoint.token, "a": checkpoint.attempt, "p": os.getpid()},
        )
        if opts.get("dataerror"):
            conn.execute(sa.text("SELECT 1 / 0"))
        if opts.get("fill"):  # N rows of 32 random characters into `sink_fill` (new pages)
            conn.execute(
                sa.text(
                    "INSERT INTO sink_fill (file_url, b)"
                    " SELECT :u, md5(random()::text) FROM generate_series(1, :n)"
                ),
                {"u": file_url, "n": int(opts["fill"])},
            )
        sleep_until = int(opts.get("sleep_until", 0))
        if opts.get("sleep") and (not sleep_until or checkpoint.attempt < sleep_until):
            time.sleep(float(opts["sleep"]))
    return {"total": 1, "filtered": 0, "persisted": 1}


@checkpointed(name="tests.plain")
def plain(file_url: str) -> dict[str, int]:
    """No checkpoint parameter: completes on its own connection."""
    return {"total": 2, "filtered": 1, "persisted": 1}


@checkpointed(name="tests.outside", file_type="test", lease_seconds=LEASE)
def outside(file_url: str) -> dict[str, int]:
    """No output transaction: sleeps `?sleep=S` seconds (its lease renewed meanwhile), then
    completes on the store's connection, as a task whose output goes elsewhere does."""
    time.sleep(float(_options(file_url).get("sleep", 0)))
    return {"total": 1, "filtered": 0, "persisted": 0}


@checkpointed(
    name="tests.chunked",
    file_type="test",
    lease_seconds=LEASE,
    max_attempts=2,
    backoff=0.2,
    backoff_max=1,
)
def chunked(file_url: str, *, checkpoint: Any) -> dict[str, int]:
    """Chunks 1..N, each a sink row and a sleep in a transaction of its own, committed with
    its number as the position; an attempt resumes after the last one committed."""
    opts = _options(file_url)
    count, pause = int(opts.get("chunks", 10)), float(opts.get("sleep", 0))
    done = checkpoint.resume("v1") or 0
    logger.warning("CHUNKED-START %s attempt=%s from=%s", file_url, checkpoint.attempt, done)
    if opts.get("kill_before"):
        os.kill(os.getpid(), signal.SIGKILL)
    for n in range(done + 1, count + 1):
        with checkpoint.chunk(n) as chunk:
            chunk.execute(
                sa.text(
                    "INSERT INTO sink (file_url, token, attempt, pid, line)"
                    " VALUES (:u, :t, :a, :p, :n)"
                ),
                {
                    "u": file_url,
                    "t": checkpoint.token,
                    "a": checkpoint.attempt,
                    "p": os.getpid(),
                    "n": n,
                },
            )
            time.sleep(pause)
            chunk.stats = Stats(n, 0, n)
    return {"total": count, "filtered": 0, "persisted": count}


@checkpointed(name="tests.batch_done", lease_seconds=LEASE, backoff=0.2, backoff_max=1)
def batch_done(file_url: str, *, checkpoint: Any) -> dict[str, int]:
    """A completion callback: its effect, one callback_runs row with the summary, commits
    with its completion."""
    summary = batch_summary(file_url)
    pause = float(os.environ.get("TESTS_CALLBACK_SLEEP") or 0)
    logger.warning("BATCH-DONE %s attempt=%s", file_url, checkpoint.attempt)
    with checkpoint.transaction() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO callback_runs (file_url, summary, pid)"
                " VALUES (:u, CAST(:s AS jsonb), :p)"
            ),
            {"u": file_url, "s": json.dumps(summary), "p": os.getpid()},
        )
        time.sleep(pause)
    return {"total": 1, "filtered": 0, "persisted": 1}
