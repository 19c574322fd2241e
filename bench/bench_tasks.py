"""Task overhead: N tasks drained by one worker (prefork -c 2, the project's settings).

Raw Celery no-op vs a @checkpointed no-op (claim + complete) vs a celery-once QueueOnce no-op
vs Procrastinate (its no-op job, a per-file `queueing_lock`, one worker of concurrency 2, on
a database of its own on the same Postgres), interleaved round by round; the figure is tasks
per second from the moment the worker starts consuming a full queue to the moment the queue
and its unacked set are empty (for Procrastinate: from its first fetch to its last job's
status written, timed inside its worker process; bench/procrastinate_app.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg
import redis

from bench import common

PROCRASTINATE_DSN = "PIPELINE_BENCH_PROCRASTINATE_DSN"


def drain_rate(
    variant: str,
    n: int,
    database_url: str,
    prefetch: int | None = None,
    root: pathlib.Path = common.ROOT,
) -> float:
    """`root`: the source tree the worker runs (another version's, for a before/after)."""
    from pipeline import app

    queue = f"bench-{variant}-{uuid.uuid4().hex[:6]}"
    idle = f"idle-{uuid.uuid4().hex[:6]}"
    env = {**common.env_for(database_url, idle), "PYTHONPATH": str(root)}
    common.flush_redis()
    extra = ["--prefetch-multiplier", str(prefetch)] if prefetch else []
    proc = common.start_worker(
        "bench.tasks_app", idle, env, "-c", "2", "--pool", "prefork", *extra, cwd=root
    )
    try:
        (node,) = common.wait_ready(app)
        os.environ["PIPELINE_BROKER_URL"] = common.REDIS_URL
        from bench import tasks_app

        task = {"raw": tasks_app.raw, "checkpointed": tasks_app.ckpt, "once": tasks_app.once}[
            variant.split("@")[0]
        ]
        run = uuid.uuid4().hex[:6]
        with app.producer_or_acquire() as producer:
            for i in range(n):
                task.apply_async(args=[f"file:///bench/{run}/{i}"], queue=queue, producer=producer)
        r = redis.Redis.from_url(common.REDIS_URL)
        assert r.llen(queue) == n, (r.llen(queue), n)
        app.control.add_consumer(queue, destination=[node], reply=True)
        started = time.monotonic()
        while r.llen(queue) or r.hlen("unacked"):
            time.sleep(0.01)
        return n / (time.monotonic() - started)
    finally:
        common.stop(proc)


@contextlib.contextmanager
def procrastinate_database() -> Iterator[str]:
    """A database of Procrastinate's own on the same server, its schema applied; dropped
    afterwards. Yields its libpq DSN (also set in the environment for procrastinate_app)."""
    name = f"pipeline_bench_procrastinate_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(common.PG_SERVER, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = common.PG_SERVER.rsplit("/", 1)[0] + "/" + name
    os.environ[PROCRASTINATE_DSN] = dsn
    try:
        from bench import procrastinate_app

        with procrastinate_app.app.open():
            procrastinate_app.app.schema_manager.apply_schema()
        yield dsn
    finally:
        with psycopg.connect(common.PG_SERVER, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def procrastinate_rate(n: int, dsn: str) -> float:
    """N no-op jobs, each deferred with its own queueing lock, drained by one worker."""
    from bench import procrastinate_app

    queue = f"bench-procrastinate-{uuid.uuid4().hex[:6]}"
    run = uuid.uuid4().hex[:6]
    with procrastinate_app.app.open():
        for i in range(n):
            url = f"file:///bench/{run}/{i}"
            procrastinate_app.noop.configure(queue=queue, queueing_lock=url).defer(file_url=url)
    env = {**os.environ, PROCRASTINATE_DSN: dsn, "PYTHONPATH": str(common.ROOT)}
    proc = subprocess.run(
        [sys.executable, str(common.ROOT / "bench" / "procrastinate_app.py"), queue],
        env=env,
        cwd=common.ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = float(proc.stdout.split()[-1])
    with psycopg.connect(dsn) as conn:
        done = conn.execute(
            "SELECT count(*) FROM procrastinate_jobs"
            " WHERE queue_name = %s AND status = 'succeeded'",
            (queue,),
        ).fetchone()
    assert done is not None
    assert done[0] == n, (done, n)
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="raw,checkpointed,once,procrastinate")
    parser.add_argument(
        "--prefetch",
        type=int,
        help="override worker_prefetch_multiplier (not the shipped settings: a side measurement,"
        " saved as results/tasks-prefetch<N>.md)",
    )
    parser.add_argument(
        "--before",
        type=pathlib.Path,
        help="a source tree of an earlier version (e.g. `git archive REV | tar -x -C DIR`): adds"
        " the row checkpointed@before, its worker running that tree's code on a database with"
        " that tree's schema, interleaved with the others (a before/after in one run)",
    )
    args = parser.parse_args()
    from pipeline import app

    app.conf.broker_url = common.REDIS_URL
    variants = args.variants.split(",")
    if args.before:
        variants.insert(
            variants.index("checkpointed") if "checkpointed" in variants else 0,
            "checkpointed@before",
        )
    with contextlib.ExitStack() as stack:
        db = stack.enter_context(common.fresh_database())
        pdb = stack.enter_context(procrastinate_database()) if "procrastinate" in variants else ""
        bdb = stack.enter_context(common.fresh_database_at(args.before)) if args.before else ""

        def side(v: str) -> Callable[[int], float]:
            if v == "procrastinate":
                return lambda r: procrastinate_rate(args.tasks, pdb)
            if v == "checkpointed@before":
                return lambda r: drain_rate(v, args.tasks, bdb, args.prefetch, args.before)
            return lambda r: drain_rate(v, args.tasks, db, args.prefetch)

        results = common.interleave({v: side(v) for v in variants}, args.rounds)
    raw = common.median(results["raw"]) if "raw" in results else None
    rows = []
    for v in variants:
        ratio = f"{common.median(results[v]) / raw:.2f}" if raw else "-"
        rows.append([v, common.spread(results[v]), ratio])
    title = f"Task overhead: {args.tasks:,} tasks, prefork -c 2, {args.rounds} rounds"
    if args.prefetch:
        title += f", prefetch multiplier {args.prefetch} (NOT the shipped settings)"
    if args.before:
        title += f"; checkpointed@before runs {args.before}"
    md = common.header(title)
    if "procrastinate" in variants:
        md += (
            "\nprocrastinate: Procrastinate's worker (one process, concurrency 2) on a database"
            " of its own on the same server; each job deferred with its own `queueing_lock`.\n"
        )
    md += "\n" + common.table(["task", "tasks/s median [min..max]", "ratio to raw"], rows)
    if raw and "checkpointed" in results:
        ck = common.median(results["checkpointed"])
        md += f"\nTarget checkpointed/raw >= 0.80: {ck / raw:.2f} "
        md += "met" if ck / raw >= 0.80 else "NOT met"
        if "once" in results:
            once_ok = ck >= common.median(results["once"])
            md += f"; checkpointed >= celery-once: {'met' if once_ok else 'NOT met'}"
        md += "\n"
    name = f"tasks-prefetch{args.prefetch}" if args.prefetch else "tasks"
    common.save(name, md, {"results": results, "tasks": args.tasks, "prefetch": args.prefetch})


if __name__ == "__main__":
    main()
