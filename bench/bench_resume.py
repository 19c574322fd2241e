"""Resume inside a file: what chunk commits cost, and what they save after a crash.

One JSON Lines file of N lines (5,000,000 by default) through the reference task on one worker
(`celery -A pipeline worker -c 1`), each run on a fresh database:

* throughput, chunked (the defaults, PIPELINE_CHUNK_RECORDS / PIPELINE_CHUNK_BYTES) against
  unchunked (one chunk for the whole file, as before resume existed), A B A B: the wall time
  from the send to `completed`, and the ratio chunked / unchunked;
* the work redone after the pool process is SIGKILLed at 90 % of the file: lines written again
  (the lines the lost attempt had written beyond its last commit, or the whole 90 % without
  chunks) and seconds from the kill to `completed`, chunked against unchunked.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys
import tempfile
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil
import psycopg

from bench import common

UNCHUNKED = {"PIPELINE_CHUNK_RECORDS": str(10**12), "PIPELINE_CHUNK_BYTES": str(10**15)}
ROW = '{"id":"e%d","ts":"2024-03-01T10:00:00Z","type":"view","user":"u%d","amount":%d.5}\n'


def generate(path: pathlib.Path, lines: int) -> None:
    with path.open("w") as out:
        for start in range(1, lines + 1, 100_000):
            stop = min(start + 100_000, lines + 1)
            out.write("".join(ROW % (n, n % 997, n % 100) for n in range(start, stop)))


def one_run(
    path: pathlib.Path, lines: int, extra: dict[str, str], kill_at: float | None
) -> dict[str, Any]:
    """The file through a new worker on a fresh database; with `kill_at`, the pool process is
    SIGKILLed once that share of the lines is written (by its committed chunks, or, without
    chunks, by the rows its open transaction has sent)."""
    from pipeline import app

    queue = f"bench-resume-{uuid.uuid4().hex[:6]}"
    url = path.as_uri()
    with common.fresh_database() as db:
        env = common.env_for(db, queue, **extra)
        common.flush_redis()
        worker = common.start_worker("pipeline", queue, env, "-c", "1", "--pool", "prefork")
        try:
            app.conf.broker_url = common.REDIS_URL
            app.conf.task_default_queue = queue
            common.wait_ready(app)
            with psycopg.connect(common.libpq_url(db), autocommit=True) as conn:
                started = time.perf_counter()
                app.send_task("pipeline.ingest", args=[url], queue=queue)
                killed, killed_line = None, 0
                while True:
                    # Lines written: those of the committed chunks, and the running COPY's.
                    status, line, copying = conn.execute(  # type: ignore[misc]
                        "SELECT c.status, (c.position->>'line')::bigint,"
                        " (SELECT max(tuples_processed) FROM pg_stat_progress_copy"
                        "   WHERE relid = 'events'::regclass)"
                        " FROM file_checkpoints c WHERE c.file_url = %s",
                        (url,),
                    ).fetchone() or (None, None, 0)
                    if status == "completed":
                        break
                    written = int(line or 0) + int(copying or 0)
                    if kill_at is not None and killed is None and written >= kill_at * lines:
                        for child in psutil.Process(worker.pid).children():
                            child.send_signal(signal.SIGKILL)
                        killed, killed_line = time.perf_counter(), written
                    time.sleep(0.05)
                took = time.perf_counter() - started
                attempts = conn.execute(
                    "SELECT attempt, outcome, (start_position->>'line')::bigint,"
                    " (end_position->>'line')::bigint FROM file_attempts WHERE file_url = %s"
                    " ORDER BY token",
                    (url,),
                ).fetchall()
                persisted = conn.execute(
                    "SELECT count(*) FROM events WHERE file_url = %s", (url,)
                ).fetchone()[0]  # type: ignore[index]
        finally:
            common.stop(worker)
    resumed_at = int(attempts[-1][2] or 0) if len(attempts) > 1 else 0
    return {
        "seconds": took,
        "after_kill": None if killed is None else started + took - killed,
        "killed_at_line": killed_line,
        "resumed_at_line": resumed_at,
        "redone_lines": max(killed_line - resumed_at, 0) if killed is not None else 0,
        "attempts": len(attempts),
        "persisted": persisted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=5_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kill-at", type=float, default=0.9)
    args = parser.parse_args()
    folder = pathlib.Path(tempfile.mkdtemp(prefix="bench-resume-"))
    path = folder / "file.jsonl"
    generate(path, args.lines)
    load = os.getloadavg()[0]
    sides = {"chunked": {}, "unchunked": UNCHUNKED}
    plain: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, extra in sides.items():
            run = one_run(path, args.lines, extra, None)
            assert run["persisted"] == args.lines, run
            plain[name].append(run["seconds"])
    crash = {name: one_run(path, args.lines, extra, args.kill_at) for name, extra in sides.items()}
    for run in crash.values():
        assert run["persisted"] == args.lines, run
    load_after = os.getloadavg()[0]
    path.unlink()
    ratio = common.median(plain["unchunked"]) / common.median(plain["chunked"])
    rows = [
        [
            name,
            f"{common.median(plain[name]):.1f} s {common.spread(plain[name])}",
            f"{args.lines / common.median(plain[name]):,.0f}",
            f"{crash[name]['redone_lines']:,}",
            f"{crash[name]['after_kill']:.1f} s",
            str(crash[name]["attempts"]),
        ]
        for name in sides
    ]
    markdown = "\n".join(
        [
            common.header(f"Resume inside a file: {args.lines:,} lines, one worker -c 1"),
            common.table(
                [
                    "commits",
                    "whole file, median [min..max]",
                    "lines/s",
                    f"lines redone after a kill at {args.kill_at:.0%}",
                    "kill to completed",
                    "attempts",
                ],
                rows,
            ),
            "",
            f"Throughput chunked / unchunked: **{ratio:.2f}** (target >= 0.95); "
            f"{args.rounds} rounds each, A B A B; load average {load:.2f} before, "
            f"{load_after:.2f} after.",
            "",
        ]
    )
    common.save(
        "resume",
        markdown,
        {"plain": plain, "crash": crash, "ratio": ratio, "load": [load, load_after]},
    )


if __name__ == "__main__":
    main()
