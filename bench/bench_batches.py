"""Batches: what the batch row costs completions, and what `status --batch` costs at scale.

* Completions per second with 4 processes on one batch, before (the schema of the commit
  before batches, `--before`, default b4cde1d: pipeline_claim_v4) and after (this tree:
  pipeline_claim_v5, which reads the batch row), A B A B on fresh databases. Each process
  claims and completes its own files of the one batch (registered beforehand) for a fixed time,
  through the same SQL the store runs (claim, then complete with the token). The issue's bar:
  after within 5 % of before.
* `status --batch` at 1,000,000 files in one batch (70 % completed, 1 % dead, the rest
  pending, vacuumed and analysed): the batch read alone (`store.batch`, the `batch` query) and
  the whole overview `status --batch` prints (`store.overview`), median of 20 calls each.

With `--before-batched`, the commit given by `--before` has batches already (e.g. the commit
before the batch counters of migration 0016): its side claims with pipeline_claim_v5 and has the
batch row too, and `status --batch` is measured on it as well, in the same run (its own code and
schema, in a process of its own), before this tree's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg

from bench import common

BATCH = "bench-batch"
PROCESSES = 4


def _dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _register(url: str, files: int, with_batch_row: bool) -> None:
    with psycopg.connect(_dsn(url), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO file_checkpoints (file_url, file_type, status, task_name, batch_id)"
            " SELECT 'bench://b/' || p || '/' || i, 'bench', 'pending', 'bench.t', %s"
            " FROM generate_series(0, %s - 1) p, generate_series(1, %s) i",
            (BATCH, PROCESSES, files // PROCESSES),
        )
        if with_batch_row:
            conn.execute(
                "INSERT INTO pipeline_batches (name, task_name, file_count)"
                " VALUES (%s, 'bench.t', %s)",
                (BATCH, files),
            )
        conn.execute("VACUUM ANALYZE file_checkpoints")


def _worker(
    url: str, claim_fn: str, part: int, seconds: float, barrier: Any, results: Any
) -> None:  # pragma: no cover - runs in the child
    claim = (
        f"SELECT outcome, token FROM {claim_fn}(%s, 'bench', 30.0, 3, 'bench', 'bench.t', NULL,"
        " NULL, NULL)"
    )
    complete = "SELECT pipeline_complete_v3(%s, %s, 1, 0, 1, NULL, NULL)"
    done = 0
    with psycopg.connect(_dsn(url), autocommit=True) as conn:
        conn.execute("SET plan_cache_mode = force_custom_plan")  # as the store's sessions
        barrier.wait()
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            i += 1
            file_url = f"bench://b/{part}/{i}"
            row = conn.execute(claim, (file_url,), prepare=True).fetchone()
            if row is None or row[0] != "granted":
                raise RuntimeError(f"claim of {file_url} not granted: {row}")
            conn.execute(complete, (file_url, row[1]), prepare=True)
            done += 1
    results.put(done)


def completions(url: str, claim_fn: str, seconds: float) -> float:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(url, claim_fn, p, seconds, barrier, results))
        for p in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    total = sum(results.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def before_tree(commit: str) -> pathlib.Path:
    root = pathlib.Path(tempfile.mkdtemp(prefix="bench_batches_before_"))
    archive = subprocess.run(
        ["git", "-C", str(common.ROOT), "archive", commit], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


def status_at_scale(files: int, calls: int) -> dict[str, float]:
    import pipeline

    with common.fresh_database("pipeline_bench_batches") as url:
        with psycopg.connect(_dsn(url), autocommit=True) as conn:
            conn.execute(
                "INSERT INTO file_checkpoints (file_url, file_type, status, task_name, batch_id,"
                " attempt, started_at, completed_at, error_message)"
                " SELECT 'bench://s/' || i, 'bench',"
                "  CASE WHEN i %% 100 = 0 THEN 'dead' WHEN i %% 10 < 7 THEN 'completed'"
                "       ELSE 'pending' END, 'bench.t', %s,"
                "  CASE WHEN i %% 10 < 7 OR i %% 100 = 0 THEN 1 ELSE 0 END,"
                "  now() - interval '1 hour', CASE WHEN i %% 10 < 7 AND i %% 100 <> 0"
                "  THEN now() - (i %% 3600) * interval '1 second' END,"
                "  CASE WHEN i %% 100 = 0 THEN 'bad' END"
                " FROM generate_series(1, %s) i",
                (BATCH, files),
            )
            conn.execute(
                "INSERT INTO pipeline_batches (name, task_name, file_count)"
                " VALUES (%s, 'bench.t', %s)",
                (BATCH, files),
            )
            conn.execute("VACUUM ANALYZE file_checkpoints")
        store = pipeline.open_store(url)
        try:
            out: dict[str, float] = {}
            for name, call in (
                ("batch", lambda: store.batch(BATCH)),
                ("overview", lambda: store.overview(BATCH)),
            ):
                call()  # connect, prepare
                times = []
                for _ in range(calls):
                    start = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - start)
                out[name] = common.median(times)
                print(f"  status --batch, {name}: {common.ms(out[name])}", file=sys.stderr)
            return out
        finally:
            store.close()


def status_at_scale_in(root: pathlib.Path, files: int, calls: int) -> dict[str, float]:
    """status_at_scale of the tree at `root` (its code, its schema), in a process of its own."""
    code = (
        "import json, sys\n"
        "from bench import bench_batches\n"
        f"print(json.dumps(bench_batches.status_at_scale({files}, {calls})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", default="b4cde1d", help="the commit before batches")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--files", type=int, default=1_000_000, help="files for status --batch")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument(
        "--before-batched",
        action="store_true",
        help="--before has batches: claim_v5 with the batch row, and status --batch measured there",
    )
    args = parser.parse_args()

    root = before_tree(args.before)
    per_process = int(args.seconds * 3000)  # more than a process completes in the time

    def side(fresh: Any, claim_fn: str, with_row: bool) -> Any:
        def run(_: int) -> float:
            with fresh() as url:
                _register(url, per_process * PROCESSES, with_row)
                return completions(url, claim_fn, args.seconds)

        return run

    rates = common.interleave(
        {
            "before": side(
                lambda: common.fresh_database_at(root),
                "pipeline_claim_v5" if args.before_batched else "pipeline_claim_v4",
                args.before_batched,
            ),
            "after": side(lambda: common.fresh_database(), "pipeline_claim_v5", True),
        },
        args.rounds,
    )
    ratio = common.median(rates["after"]) / common.median(rates["before"])
    status_before = (
        status_at_scale_in(root, args.files, args.calls) if args.before_batched else None
    )
    status = status_at_scale(args.files, args.calls)
    markdown = common.header("Batches: completions on one batch, and status --batch at scale")
    markdown += (
        f"\n{PROCESSES} processes claiming and completing files of one batch for "
        f"{args.seconds:.0f} s, {args.rounds} rounds A B (before: {args.before}, "
        + (
            "pipeline_claim_v5 with the batch row; after: this tree):\n\n"
            if args.before_batched
            else "pipeline_claim_v4; after: pipeline_claim_v5 reading the batch row):\n\n"
        )
    )
    markdown += common.table(
        ["side", "completions/s, median [min..max]"],
        [["before", common.spread(rates["before"])], ["after", common.spread(rates["after"])]],
    )
    markdown += (
        f"\nafter / before: {ratio:.3f} (the bar: at least 0.95) "
        f"{common.verdict(ratio >= 0.95)}\n\n"
        f"`status --batch` at {args.files:,} files in one batch, median of {args.calls}: the "
        f"batch read {common.ms(status['batch'])}, the whole overview "
        f"{common.ms(status['overview'])} (the issue's bar: 50 ms).\n"
    )
    if status_before is not None:
        markdown += (
            f"\nThe same on {args.before}, in this run before it: the batch read "
            f"{common.ms(status_before['batch'])}, the whole overview "
            f"{common.ms(status_before['overview'])}.\n"
        )
    common.save(
        "batches",
        markdown,
        {
            "rates": rates,
            "ratio": ratio,
            "status_seconds": status,
            "status_seconds_before": status_before,
            "args": vars(args),
        },
    )


if __name__ == "__main__":
    main()
