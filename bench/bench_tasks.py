"""Task overhead: N tasks drained by one worker (prefork -c 2, the project's settings).

Raw Celery no-op vs a @checkpointed no-op (claim + complete) vs a celery-once QueueOnce no-op,
interleaved round by round; the figure is tasks per second from the moment the worker starts
consuming a full queue to the moment the queue and its unacked set are empty.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import redis

from bench import common


def drain_rate(variant: str, n: int, database_url: str, prefetch: int | None = None) -> float:
    from pipeline import app

    queue = f"bench-{variant}-{uuid.uuid4().hex[:6]}"
    idle = f"idle-{uuid.uuid4().hex[:6]}"
    env = common.env_for(database_url, idle)
    common.flush_redis()
    extra = ["--prefetch-multiplier", str(prefetch)] if prefetch else []
    proc = common.start_worker("bench.tasks_app", idle, env, "-c", "2", "--pool", "prefork", *extra)
    try:
        (node,) = common.wait_ready(app)
        os.environ["PIPELINE_BROKER_URL"] = common.REDIS_URL
        from bench import tasks_app

        task = {"raw": tasks_app.raw, "checkpointed": tasks_app.ckpt, "once": tasks_app.once}[
            variant
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="raw,checkpointed,once")
    parser.add_argument(
        "--prefetch",
        type=int,
        help="override worker_prefetch_multiplier (not the shipped settings: a side measurement,"
        " saved as results/tasks-prefetch<N>.md)",
    )
    args = parser.parse_args()
    from pipeline import app

    app.conf.broker_url = common.REDIS_URL
    variants = args.variants.split(",")
    with common.fresh_database() as db:
        results = common.interleave(
            {v: (lambda r, v=v: drain_rate(v, args.tasks, db, args.prefetch)) for v in variants},
            args.rounds,
        )
    raw = common.median(results["raw"]) if "raw" in results else None
    rows = []
    for v in variants:
        ratio = f"{common.median(results[v]) / raw:.2f}" if raw else "-"
        rows.append([v, common.spread(results[v]), ratio])
    title = f"Task overhead: {args.tasks:,} tasks, prefork -c 2, {args.rounds} rounds"
    if args.prefetch:
        title += f", prefetch multiplier {args.prefetch} (NOT the shipped settings)"
    md = common.header(title)
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
