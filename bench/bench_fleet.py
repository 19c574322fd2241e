"""A fleet behind PgBouncer: 200 pool processes, one transaction pool of 20 server connections.

W `celery worker -c C` (prefork; W x C pool processes, 25 x 8 = 200 by default) reach the
database through a private PgBouncer 1.18 (Debian's) in transaction mode, `default_pool_size`
20, with PIPELINE_DATABASE_POOLER=transaction (no prepared statements) and the migrations run
on the direct URL. N files of bench/fleet_app.py (each claimed, asleep S seconds, completed)
are sent at once. Reported: the claim's latency (from the pool process taking the message to
the task's body: the claim through the pooler) as p50 / p99 / max, the wall time against the
ideal N x S / (W x C), the server connections seen, and whether every file completed once
(one attempt each, every row `completed`).

    .venv/bin/python bench/bench_fleet.py [--workers 25 --concurrency 8 --files 2000 --sleep 1]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg

from bench import common


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=25)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--sleep", type=float, default=1.0)
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--direct", action="store_true", help="no PgBouncer: for comparison")
    args = parser.parse_args()
    from tests.support import pgbouncer

    why = pgbouncer.available()
    if why is not None:
        sys.exit(f"bench_fleet needs PgBouncer: {why}")
    processes = args.workers * args.concurrency
    load_before = os.getloadavg()
    with (
        common.fresh_database("pipeline_bench_fleet") as db,
        tempfile.TemporaryDirectory() as tmp,
        pgbouncer.PgBouncer(db, mode="transaction", pool_size=args.pool_size) as bouncer,
    ):
        queue = f"bench-fleet-{uuid.uuid4().hex[:6]}"
        via = {"PIPELINE_DATABASE_POOLER": "transaction", "PIPELINE_DATABASE_DIRECT_URL": db}
        env = common.env_for(
            db if args.direct else bouncer.url(db),
            queue,
            PIPELINE_BENCH_FLEET_DIR=tmp,
            PIPELINE_BENCH_FLEET_SLEEP=str(args.sleep),
            **({} if args.direct else via),
        )
        common.flush_redis()
        print(f"  starting {args.workers} workers x {args.concurrency} ...", file=sys.stderr)
        workers = [
            common.start_worker(
                "bench.fleet_app", queue, env, "-c", str(args.concurrency), "--pool", "prefork",
                "--prefetch-multiplier", "1",
            )
            for _ in range(args.workers)
        ]  # fmt: skip
        server_connections: list[int] = []
        done = threading.Event()
        try:
            os.environ["PIPELINE_BROKER_URL"] = common.REDIS_URL
            from bench import fleet_app

            common.wait_ready(fleet_app.app, count=args.workers, timeout=300)
            watcher = threading.Thread(
                target=_count_connections, args=(db, server_connections, done), daemon=True
            )
            watcher.start()
            urls = [f"file:///bench/fleet/{i:05d}" for i in range(args.files)]
            started = time.perf_counter()
            with fleet_app.app.producer_or_acquire() as producer:
                for url in urls:
                    fleet_app.fleet.apply_async(args=[url], queue=queue, producer=producer)
            rows = _wait_completed(db, args.files, timeout=args.files * args.sleep + 600)
            wall = time.perf_counter() - started
        finally:
            done.set()
            for proc in workers:
                common.stop(proc)
        first, warm = _claims(pathlib.Path(tmp))
        attempts = rows["attempts"]
    load_after = os.getloadavg()
    ideal = args.files * args.sleep / processes
    once = rows["completed"] == args.files and attempts == args.files
    md = common.header(
        f"Fleet: {processes} pool processes through PgBouncer (pool {args.pool_size})"
    )
    md += (
        f"\n{args.workers} workers x -c {args.concurrency}, {args.files:,} files of "
        f"{args.sleep:g} s, PgBouncer 1.18 transaction mode, default_pool_size {args.pool_size}. "
        f"Load average before {load_before[0]:.2f}, after {load_after[0]:.2f}.\n\n"
    )
    md += common.table(
        ["what", "figure"],
        [
            ["claims timed (one per body start)", f"{len(first) + len(warm):,}"],
            ["claim latency p50 (after a process's first)", common.ms(percentile(warm, 0.50), 1)],
            ["claim latency p99 (after a process's first)", common.ms(percentile(warm, 0.99), 1)],
            ["claim latency max (after a process's first)", common.ms(max(warm), 1)],
            [
                "a process's first claim (connects): p50 / max",
                f"{common.ms(percentile(first, 0.5), 1)} / {common.ms(max(first), 1)}",
            ],
            ["wall, send to the last completion", f"{wall:,.1f} s (ideal {ideal:,.1f} s)"],
            ["server connections (pg_stat_activity, max seen)", str(max(server_connections))],
            [
                "every file completed once",
                f"{common.verdict(once)} ({rows['completed']:,} completed, {attempts:,} attempts)",
            ],
        ],
    )
    common.save(
        "fleet",
        md,
        {
            "args": vars(args),
            "first_claims_s": first,
            "claims_s": warm,
            "wall_s": wall,
            "server_connections": max(server_connections),
            "completed": rows["completed"],
            "attempts": attempts,
            "load": [load_before, load_after],
        },
    )


def _count_connections(db: str, seen: list[int], done: threading.Event) -> None:
    """The database's backends (PgBouncer's server connections), every half second."""
    name = db.rsplit("/", 1)[-1]
    with psycopg.connect(common.libpq_url(db).rsplit("/", 1)[0] + "/postgres") as conn:
        conn.autocommit = True
        while not done.is_set():
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)
            ).fetchone()
            seen.append(int(row[0]) if row else 0)
            time.sleep(0.5)


def _wait_completed(db: str, files: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with psycopg.connect(common.libpq_url(db), autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'completed'),"
                " (SELECT count(*) FROM file_attempts) FROM file_checkpoints"
            ).fetchone()
            completed, attempts = (int(row[0]), int(row[1])) if row else (0, 0)
            if completed >= files or time.monotonic() > deadline:
                return {"completed": completed, "attempts": attempts}
            time.sleep(0.2)


def _claims(folder: pathlib.Path) -> tuple[list[float], list[float]]:
    """The claim latencies: each pool process's first (its connection made then) and the rest."""
    first, warm = [], []
    for path in folder.glob("claims-*.txt"):
        for n, line in enumerate(path.read_text().splitlines()):
            (first if n == 0 else warm).append(float(line.split(" ", 1)[0]))
    return first, warm


if __name__ == "__main__":
    main()
