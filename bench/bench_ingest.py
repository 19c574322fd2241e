"""The reference ingest end to end, against what Python and psql can do with the same rows.

N records in F files (JSON Lines, and the same rows as CSV and as .jsonl.gz) generated into a
temporary folder. Each format goes through `pipeline submit --glob ... --wait` with one
`celery -A pipeline worker -c 2` against a fresh database (wall time of the submit, which
polls every 0.5 s). The baselines, each on its own fresh database, write the same rows into
that database's own `events` table (same indexes, same unique constraint): json.loads +
datetime.fromisoformat + psycopg COPY, one transaction per file, from 2 processes; and one
`psql \\copy` of all the rows from one CSV stream (the database's own ceiling). Peak RSS is
the sum over the worker's process tree (main process and pool children), sampled every 0.1 s.
The pipeline's wall time includes the `pipeline submit` interpreter start (~0.6 s) and up to
0.5 s of polling: small runs (--records 100000) understate it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import gzip
import io
import json
import multiprocessing
import os
import pathlib
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil
import psycopg

from bench import common

FORMATS = ("jsonl", "csv", "jsonl.gz")
COLUMNS = ("id", "ts", "type", "user", "city", "amount")
TYPES = ("click", "view", "purchase", "signup")
CITIES = ("Berlin", "Zürich", "São Paulo", "Kraków", "Oslo", "Tōkyō")
COPY_SQL = "COPY events (file_url, line, event_id, ts, type, payload) FROM STDIN"


# -- input -----------------------------------------------------------------------------------


def rows_of(file_index: int, count: int) -> Iterator[dict[str, Any]]:
    """The records of one file, the same for every format (seeded by the file's index)."""
    rng = random.Random(file_index)
    epoch = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    for line in range(1, count + 1):
        ts = epoch + dt.timedelta(seconds=rng.randrange(366 * 86400))
        yield {
            "id": f"evt-{file_index:04d}-{line:07d}",
            "ts": ts.isoformat().replace("+00:00", "Z"),
            "type": TYPES[rng.randrange(4)],
            "user": f"u{rng.randrange(1000):03d}",
            "city": CITIES[rng.randrange(len(CITIES))],
            "amount": round(rng.uniform(0, 500), 2),
        }


def generate(folder: pathlib.Path, records: int, files: int) -> dict[str, list[pathlib.Path]]:
    """records spread over files, once per format; {format: paths}."""
    per_file = [records // files + (1 if i < records % files else 0) for i in range(files)]
    made: dict[str, list[pathlib.Path]] = {f: [] for f in FORMATS}
    for index, count in enumerate(per_file):
        rows = list(rows_of(index, count))
        jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows([r[c] for c in COLUMNS] for r in rows)
        data = {
            "jsonl": jsonl,
            "csv": out.getvalue().encode(),
            "jsonl.gz": gzip.compress(jsonl, compresslevel=6, mtime=0),
        }
        for fmt in FORMATS:
            sub = folder / fmt.replace(".", "_")
            sub.mkdir(exist_ok=True)
            path = sub / f"part-{index:04d}.{fmt}"
            path.write_bytes(data[fmt])
            made[fmt].append(path)
    return made


# -- the pipeline ------------------------------------------------------------------------------


class PeakRss:
    """Samples the summed RSS of a process and its descendants in a thread; keeps the peak."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def now(pid: int) -> int:
        """The summed RSS of pid and its descendants at this moment."""
        total = 0
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now(self.pid))
            self._stop.wait(self.every)


def run_pipeline(
    fmt: str,
    paths: list[pathlib.Path],
    records: int,
    *,
    pattern: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The reference task on one format's files through a real worker; records/s and RSS.

    `pattern`: another glob over the same files (an s3:// copy), read with `extra_env`.
    """
    from pipeline import app

    queue = f"bench-ingest-{uuid.uuid4().hex[:6]}"
    batch = f"bench-ingest-{fmt.replace('.', '-')}-{uuid.uuid4().hex[:6]}"
    with common.fresh_database() as db:
        env = common.env_for(db, queue, **(extra_env or {}))
        common.flush_redis()
        worker = common.start_worker("pipeline", queue, env, "-c", "2", "--pool", "prefork")
        try:
            common.wait_ready(app)
            idle = PeakRss.now(worker.pid)
            pattern = pattern or str(paths[0].parent / f"*.{fmt}")
            cmd = [common.pipeline_executable(), "submit", "--glob", pattern, "--batch", batch]
            with PeakRss(worker.pid) as rss:
                took, _ = common.timed_run([*cmd, "--wait"], env)
        finally:
            common.stop(worker)
        with psycopg.connect(common.libpq_url(db)) as conn:
            (count,) = conn.execute("SELECT count(*) FROM events").fetchone()  # type: ignore[misc]
            (attempts,) = conn.execute(  # type: ignore[misc]
                "SELECT max(attempt) FROM file_checkpoints WHERE status = 'completed'"
            ).fetchone()
    if count != records:
        raise RuntimeError(f"{fmt}: {count:,} events written, expected {records:,}")
    return {
        "seconds": took,
        "rate": records / took,
        "peak_rss": rss.peak,
        "idle_rss": idle,
        "attempts": attempts,
    }


def run_long_file(folder: pathlib.Path, lines: int) -> dict[str, Any]:
    """One file of `lines` records through one worker (-c 2), the row watched meanwhile.

    Every 0.5 s, from another connection: the lease left (lease_expires_at - now(), on the
    database clock) and its value, so the renewals show as distinct expiry times. The lease
    is the shipped one (30 s, renewed every 10 s): a starved heartbeat would let it lapse
    and the sweep hand the file to the other pool process (attempt 2).
    """
    from pipeline import app

    path = folder / "long" / "long.jsonl"
    path.parent.mkdir()
    with path.open("w", encoding="utf-8") as out:
        for start in range(0, lines, 100_000):
            rows = rows_of(start // 100_000, min(100_000, lines - start))
            out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    size = path.stat().st_size
    queue = f"bench-long-{uuid.uuid4().hex[:6]}"
    margins: list[float] = []
    expiries: set[Any] = set()
    with common.fresh_database() as db:
        env = common.env_for(db, queue)
        common.flush_redis()
        worker = common.start_worker("pipeline", queue, env, "-c", "2", "--pool", "prefork")
        url = path.as_uri()
        try:
            common.wait_ready(app)
            idle = PeakRss.now(worker.pid)
            cmd = [common.pipeline_executable(), "submit", url, "--batch", f"long-{queue}"]
            common.timed_run(cmd, env)
            started = time.perf_counter()
            with PeakRss(worker.pid) as rss, psycopg.connect(common.libpq_url(db)) as conn:
                conn.autocommit = True
                while True:
                    status, left, expires = conn.execute(  # type: ignore[misc]
                        "SELECT status, extract(epoch FROM lease_expires_at - now()),"
                        " lease_expires_at FROM file_checkpoints WHERE file_url = %s",
                        (url,),
                    ).fetchone()
                    if status != "processing":
                        break
                    if left is not None:
                        margins.append(float(left))
                        expiries.add(expires)
                    time.sleep(0.5)
            took = time.perf_counter() - started
        finally:
            common.stop(worker)
        with psycopg.connect(common.libpq_url(db)) as conn:
            status, attempt, persisted = conn.execute(  # type: ignore[misc]
                "SELECT status, attempt, records_persisted FROM file_checkpoints"
                " WHERE file_url = %s",
                (url,),
            ).fetchone()
    path.unlink()
    return {
        "lines": lines,
        "bytes": size,
        "seconds": took,
        "status": status,
        "attempt": attempt,
        "persisted": persisted,
        "peak_rss": rss.peak,
        "idle_rss": idle,
        "min_lease_left": min(margins, default=None),
        "renewals": max(len(expiries) - 1, 0),
        "samples": len(margins),
    }


# -- baselines -------------------------------------------------------------------------------


def _baseline_file(args: tuple[str, str]) -> int:
    """json.loads + fromisoformat + COPY of one file, in one transaction, like the task."""
    dsn, path = args
    url = pathlib.Path(path).as_uri()
    written = 0
    with (
        psycopg.connect(dsn) as conn,
        conn.cursor() as cur,
        cur.copy(COPY_SQL) as copy,
        open(path, encoding="utf-8") as handle,
    ):
        for number, line in enumerate(handle, start=1):
            fields = json.loads(line)
            ts = dt.datetime.fromisoformat(fields.pop("ts"))
            event_id, kind = fields.pop("id"), fields.pop("type")
            copy.write_row((url, number, event_id, ts, kind, json.dumps(fields)))
            written += 1
    return written


def run_baseline(paths: list[pathlib.Path], records: int, processes: int) -> dict[str, Any]:
    with common.fresh_database() as db:
        dsn = common.libpq_url(db)
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(processes) as pool:
            started = time.perf_counter()
            written = sum(pool.map(_baseline_file, [(dsn, str(p)) for p in paths], chunksize=1))
            took = time.perf_counter() - started
    if written != records:
        raise RuntimeError(f"baseline wrote {written:,}, expected {records:,}")
    return {"seconds": took, "rate": records / took}


def run_psql(paths: list[pathlib.Path], records: int, folder: pathlib.Path) -> dict[str, Any]:
    """`psql \\copy` of every row from one CSV stream, the rows prepared beforehand."""
    stream = folder / "all-rows.csv"
    with stream.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, lineterminator="\n")
        for path in paths:
            url = path.as_uri()
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    fields = json.loads(line)
                    ts, event_id, kind = fields.pop("ts"), fields.pop("id"), fields.pop("type")
                    writer.writerow((url, number, event_id, ts, kind, json.dumps(fields)))
    with common.fresh_database() as db:
        copy = (
            r"\copy events (file_url, line, event_id, ts, type, payload) "
            f"FROM '{stream}' WITH (FORMAT csv)"
        )
        *flags, name = common.pg_cli_args(db)
        cmd = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", *flags, "-d", name, "-c", copy]
        took, _ = common.timed_run(cmd)
    stream.unlink()
    return {"seconds": took, "rate": records / took}


# -- report ----------------------------------------------------------------------------------


def mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--processes", type=int, default=2, help="baseline processes")
    parser.add_argument(
        "--long-lines",
        type=int,
        default=5_000_000,
        help="lines of the one long file whose lease and RSS are watched (0: skip)",
    )
    args = parser.parse_args()
    formats = args.formats.split(",")
    from pipeline import app

    app.conf.broker_url = common.REDIS_URL
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-ingest-") as tmp:
        folder = pathlib.Path(tmp)
        t0 = time.perf_counter()
        made = generate(folder, args.records, args.files)
        size = sum(p.stat().st_size for p in made["jsonl"])
        print(f"  generated in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        results["json+COPY"] = run_baseline(made["jsonl"], args.records, args.processes)
        print(f"  json+COPY: {results['json+COPY']['rate']:,.0f}/s", file=sys.stderr, flush=True)
        if shutil.which("psql"):
            results["psql"] = run_psql(made["jsonl"], args.records, folder)
            print(f"  psql: {results['psql']['rate']:,.0f}/s", file=sys.stderr, flush=True)
        for fmt in formats:
            results[fmt] = run_pipeline(fmt, made[fmt], args.records)
            print(f"  {fmt}: {results[fmt]['rate']:,.0f}/s", file=sys.stderr, flush=True)
        if args.long_lines:
            long = results["long"] = run_long_file(folder, args.long_lines)
            print(f"  long file: {long}", file=sys.stderr, flush=True)
    # What the submit's own start costs (interpreter, imports): the "net" column leaves it out.
    startup = common.median(
        [common.timed_run([common.pipeline_executable(), "--help"])[0] for _ in range(3)]
    )
    for fmt in formats:
        results[fmt]["net_rate"] = args.records / max(results[fmt]["seconds"] - startup, 1e-3)
    base = results["json+COPY"]["rate"]
    rows = [
        [
            f"json.loads + fromisoformat + psycopg COPY, {args.processes} processes (baseline)",
            f"{base:,.0f}",
            "1.00",
            "-",
            f"{results['json+COPY']['seconds']:.1f} s",
            "-",
        ]
    ]
    if "psql" in results:
        psql = results["psql"]
        rows.append(
            [
                r"`psql \copy`, one CSV stream",
                f"{psql['rate']:,.0f}",
                f"{psql['rate'] / base:.2f}",
                "-",
                f"{psql['seconds']:.1f} s",
                "-",
            ]
        )
    for fmt in formats:
        r = results[fmt]
        rows.append(
            [
                f"`pipeline submit --glob '*.{fmt}' --wait`, worker -c 2",
                f"{r['rate']:,.0f}",
                f"{r['rate'] / base:.2f}",
                f"{r['net_rate']:,.0f} ({r['net_rate'] / base:.2f})",
                f"{r['seconds']:.1f} s",
                f"{mb(r['peak_rss'])} ({mb(r['idle_rss'])} idle)",
            ]
        )
    md = common.header(f"Ingest: {args.records:,} records in {args.files} files")
    md += (
        f"\nThe same rows as JSON Lines ({size / 2**20:,.0f} MB), CSV and .jsonl.gz; each side "
        "on a fresh database, into its `events` table (same indexes). Peak RSS: the worker's "
        "process tree (main process and 2 pool children) summed, beside the same tree idle "
        f"before the submit. Net: the wall minus `pipeline --help` ({startup:.2f} s, the "
        "submit's interpreter start), still with up to 0.5 s of --wait polling. "
        + ("" if "psql" in results else "psql not found: its row is left out. ")
        + "\n\n"
    )
    md += common.table(
        [
            "side",
            "records/s",
            "ratio to json+COPY",
            "net of start-up (ratio)",
            "wall",
            "worker peak RSS",
        ],
        rows,
    )
    if "jsonl" in results:
        ratio = results["jsonl"]["rate"] / base
        verdict = common.verdict(ratio >= 0.8)
        md += f"\nTarget JSON Lines ingest >= 0.80 of json+COPY: {ratio:.2f} {verdict}\n"
    if "long" in results:
        long = results["long"]
        left = long["min_lease_left"]
        ok = long["status"] == "completed" and long["attempt"] == 1 and left is not None
        ok = ok and left > 0
        md += (
            f"\nOne file of {long['lines']:,} lines ({long['bytes'] / 2**20:,.0f} MB JSON Lines), "
            f"one worker -c 2, shipped 30 s lease: {long['status']} on attempt "
            f"{long['attempt']} in {long['seconds']:.1f} s "
            f"({long['lines'] / long['seconds']:,.0f} records/s), {long['persisted']:,} "
            f"persisted; the lease was renewed {long['renewals']} times and never had less "
            f"than {left if left is None else f'{left:.1f}'} s left ({long['samples']} "
            f"samples, every 0.5 s); worker peak RSS {mb(long['peak_rss'])} "
            f"({mb(long['idle_rss'])} idle). "
            f"Lease kept and attempt 1: {common.verdict(ok)}\n"
        )
    common.save(
        "ingest",
        md,
        {"startup_s": startup, "results": results, "records": args.records, "files": args.files},
    )


if __name__ == "__main__":
    main()
