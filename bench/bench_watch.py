"""Watch: one scan of N objects on a local S3 server (SeaweedFS), against the listing alone.

A private `weed server -s3` (tests/support/s3server.py) holds N small objects under
`bkt/in/DDD/`, 1,000 per folder. They are created through the filer's HTTP API, which is
about five times faster here than `s3fs.pipe` (boto signs every request in Python: 10,000
objects took 72 s through s3fs, 14 s through the filer). A first scan registers them all (a
fresh database; its messages go to a queue nobody consumes, flushed after). Then, per round:

* the listing alone: `fs.glob("bkt/in/**/*.jsonl", detail=True)` on a fresh s3fs client;
* a scan that finds nothing new (`pipeline.sources.watch.scan`, in this process: listing, one
  register statement per 1,000 URLs, no message);
* a scan after `--new` more objects arrived (those registered and enqueued).

Then the cost of the register statement itself on N known URLs, this version against the one
before issue 11 (whose ON CONFLICT DO UPDATE locked every conflicting row even when it changed
nothing): time, and WAL records and bytes from `EXPLAIN (ANALYZE, WAL)`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg

from bench import common

PATTERN = "s3://bkt/in/**/*.jsonl"
# `register` of pipeline/store/sql/queries.sql before issue 11 (commit c88a510), for the
# side-by-side cost.
REGISTER_BEFORE = """
WITH input AS (
    SELECT DISTINCT ON (u.file_url) u.file_url, u.fingerprint
      FROM unnest(CAST(%(urls)s AS text[]), CAST(%(fingerprints)s AS text[]))
           AS u(file_url, fingerprint)
     ORDER BY u.file_url
), upserted AS (
    INSERT INTO file_checkpoints AS c (file_url, file_type, status, max_attempts, task_name,
                                       batch_id, fingerprint)
    SELECT i.file_url, %(file_type)s, 'pending', %(max_attempts)s, %(task_name)s, %(batch_id)s,
           i.fingerprint
      FROM input i
    ON CONFLICT (file_url) DO UPDATE
       SET status = 'pending', attempt = 0, generation = c.generation + 1, token = NULL,
           lease_expires_at = NULL, error_message = NULL, completed_at = NULL,
           records_total = 0, records_filtered = 0, records_persisted = 0,
           processing_time_ms = 0, details = NULL,
           fingerprint = excluded.fingerprint, batch_id = excluded.batch_id,
           task_name = excluded.task_name, max_attempts = excluded.max_attempts,
           updated_at = now()
     WHERE c.status IN ('completed', 'dead')
       AND excluded.fingerprint IS NOT NULL AND c.fingerprint IS NOT NULL
       AND excluded.fingerprint <> c.fingerprint
    RETURNING c.file_url, c.status, c.task_name
)
SELECT i.file_url, coalesce(u.status, c.status) AS status,
       u.file_url IS NOT NULL OR c.status = 'pending' AS needs_task,
       coalesce(u.task_name, c.task_name) AS task_name
  FROM input i
  LEFT JOIN upserted u ON u.file_url = i.file_url
  LEFT JOIN file_checkpoints c ON c.file_url = i.file_url AND u.file_url IS NULL
"""


def filer_url(server: Any) -> str:
    port = next(a for a in server.process.args if a.startswith("-filer.port="))
    return f"http://127.0.0.1:{port.split('=', 1)[1]}"


def create(filer: str, names: list[str], concurrency: int = 64) -> float:
    """PUT every object through the filer (S3 buckets live under /buckets); seconds taken."""
    import aiohttp

    async def run() -> None:
        limit = asyncio.Semaphore(concurrency)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(name: str) -> None:
                async with limit:
                    form = aiohttp.FormData()
                    form.add_field("file", b'{"id": 1}\n', filename=name.rsplit("/", 1)[1])
                    async with session.post(f"{filer}/buckets/{name}", data=form) as reply:
                        if reply.status >= 300:
                            raise RuntimeError(f"{name}: {reply.status} {await reply.text()}")

            await asyncio.gather(*(one(n) for n in names))

    started = time.monotonic()
    asyncio.run(run())
    return time.monotonic() - started


def names(start: int, stop: int, prefix: str = "bkt/in") -> list[str]:
    return [f"{prefix}/{i // 1000:03d}/{i:07d}.jsonl" for i in range(start, stop)]


def register_cost(
    database_url: str, sql: str, pairs: list[tuple[str, str | None]]
) -> dict[str, float]:
    """Every 1,000-URL statement over `pairs` under EXPLAIN (ANALYZE, WAL): summed."""
    total = {"seconds": 0.0, "wal_records": 0.0, "wal_bytes": 0.0}
    with psycopg.connect(common.libpq_url(database_url), autocommit=True) as conn:
        for start in range(0, len(pairs), 1000):
            chunk = pairs[start : start + 1000]
            params = {
                "urls": [u for u, _ in chunk],
                "fingerprints": [f for _, f in chunk],
                "file_type": "events",
                "max_attempts": 3,
                "task_name": "pipeline.ingest",
                "batch_id": "bench",
                "changes_only": True,  # as a watch asks (the statement before ignores it)
            }
            t0 = time.monotonic()
            (plan,) = conn.execute(
                "EXPLAIN (ANALYZE, WAL, FORMAT JSON) " + sql,  # type: ignore[arg-type]
                params,
            ).fetchone()  # type: ignore[misc]
            total["seconds"] += time.monotonic() - t0
            top = (plan if isinstance(plan, list) else json.loads(plan))[0]["Plan"]
            total["wal_records"] += top.get("WAL Records", 0)
            total["wal_bytes"] += top.get("WAL Bytes", 0)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--new", type=int, default=1000, help="objects added before round's scan")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import redis
    import s3fs

    import pipeline
    from pipeline.sender import Sender
    from pipeline.sources import urls, watch
    from pipeline.store import postgres
    from pipeline.worker.celery_app import app
    from tests.support import s3server

    folder = pathlib.Path(tempfile.mkdtemp(prefix="bench-watch-"))
    queue = f"bench-watch-{uuid.uuid4().hex[:6]}"
    with (
        contextlib.ExitStack() as cleanup,
        s3server.running(folder) as server,
        common.fresh_database() as database_url,
    ):
        cleanup.callback(shutil.rmtree, folder, True)
        os.environ.update(server.env())
        fs = server.filesystem()
        fs.mkdir("bkt")
        filer = filer_url(server)
        made = args.objects
        created = create(filer, names(0, made))
        print(f"created {made:,} objects in {created:.1f} s", file=sys.stderr, flush=True)

        app.conf.broker_url = common.REDIS_URL
        app.conf.task_default_queue = queue
        store = pipeline.open_store(database_url)
        sender = Sender(app)
        send = sender.send

        def listing() -> float:
            fresh = s3fs.S3FileSystem(
                key=s3server.ACCESS_KEY,
                secret=s3server.SECRET_KEY,
                client_kwargs={"endpoint_url": server.endpoint, "region_name": "us-east-1"},
                skip_instance_cache=True,
            )
            t0 = time.monotonic()
            found = fresh.glob("bkt/in/**/*.jsonl", detail=True)
            took = time.monotonic() - t0
            assert len(found) == made, (len(found), made)
            return took

        sending = [0.0]

        def timed_send(task: str, url: str) -> None:
            t0 = time.monotonic()
            send(task, url)
            sending[0] += time.monotonic() - t0

        def scan(sender: Any = timed_send) -> watch.ScanReport:
            sending[0] = 0.0
            return watch.scan(store, PATTERN, sender, batch_id="bench")

        def drop_queue() -> None:
            # Only this run's queue: the Redis database may serve others meanwhile.
            redis.Redis.from_url(common.REDIS_URL).delete(queue)

        # The first scan only seeds the table (all new): its messages are not what is measured.
        first = scan(lambda task, url: None)
        assert first.ok, first.line()
        assert first.new == made, first.line()
        print(first.line(), file=sys.stderr, flush=True)
        drop_queue()
        figures: dict[str, list[float]] = {
            "listing": [],
            "nothing_new": [],
            "nothing_new_listing": [],
            "with_new": [],
            "sending": [],
        }
        for r in range(args.rounds):
            lst = listing()
            idle = scan()
            assert idle.ok, idle.line()
            assert (idle.enqueued, idle.seen) == (0, made), idle.line()
            create(filer, names(made, made + args.new))
            made += args.new
            busy = scan()
            figures["sending"].append(sending[0])
            assert busy.ok, busy.line()
            assert busy.new == args.new == busy.enqueued, busy.line()
            drop_queue()
            figures["listing"].append(lst)
            figures["nothing_new"].append(idle.seconds)
            figures["nothing_new_listing"].append(idle.list_seconds)
            figures["with_new"].append(busy.seconds)
            print(
                f"  round {r + 1}: listing {lst:.2f} s, nothing new {idle.seconds:.2f} s "
                f"(its listing {idle.list_seconds:.2f} s), {args.new} new {busy.seconds:.2f} s",
                file=sys.stderr,
                flush=True,
            )
        sender.close()
        store.close()

        # The URLs and fingerprints the scans registered, as they registered them.
        listed = fs.glob("bkt/in/**/*.jsonl", detail=True)
        known = [(f"s3://{n}", urls.fingerprint_from_info(i)) for n, i in listed.items()]
        now_cost = register_cost(database_url, postgres.driver_queries()["register"], known)
        before_cost = register_cost(database_url, REGISTER_BEFORE, known)

    med = {k: common.median(v) for k, v in figures.items()}
    n_txt = f"{args.objects:,}"
    rows = [
        ["listing alone (`fs.glob`, fresh client)", f"{med['listing']:.2f} s", "1.00"],
        [
            "scan, nothing new (0 enqueued)",
            f"{med['nothing_new']:.2f} s (listing and names {med['nothing_new_listing']:.2f} s)",
            f"{med['nothing_new'] / med['listing']:.2f}",
        ],
        [
            f"scan, {args.new:,} new ({args.new:,} enqueued)",
            f"{med['with_new']:.2f} s (sending {args.new:,} messages {med['sending']:.2f} s)",
            f"{med['with_new'] / med['listing']:.2f}",
        ],
    ]
    cost_rows = [
        [
            name,
            f"{c['seconds']:.2f} s",
            f"{c['wal_records']:,.0f}",
            f"{c['wal_bytes'] / 1e6:,.2f} MB",
        ]
        for name, c in (("this version", now_cost), ("before (c88a510)", before_cost))
    ]
    markdown = (
        common.header(f"Watch: one scan of {n_txt} objects on a local SeaweedFS")
        + f"\nMedian of {args.rounds} rounds; the objects were created in {created:.0f} s "
        "through the filer. `.venv/bin/python bench/bench_watch.py"
        + (f" --objects {args.objects}" if args.objects != 100_000 else "")
        + "`.\n\n"
        + common.table(["", "time", "vs listing"], rows)
        + f"\nThe register statements alone on {n_txt} known URLs (one per 1,000, under "
        "`EXPLAIN (ANALYZE, WAL)`):\n\n"
        + common.table(["register", "time", "WAL records", "WAL"], cost_rows)
    )
    common.save(
        "watch",
        markdown,
        {"figures": figures, "register_now": now_cost, "register_before": before_cost},
    )


if __name__ == "__main__":
    main()
