"""Task overhead: N tasks drained by one worker (prefork -c 2, the project's settings).

Raw Celery no-op vs a @checkpointed no-op (claim + complete) vs a celery-once QueueOnce no-op
vs Procrastinate (its no-op job, a per-file `queueing_lock`, one worker of concurrency 2, on
a database of its own on the same Postgres), interleaved round by round; the figure is tasks
per second from the moment the worker starts consuming a full queue to the moment the queue
and its unacked set are empty (for Procrastinate: from its first fetch to its last job's
status written, timed inside its worker process; bench/procrastinate_app.py).

Beside each Celery row, the CPU each task cost over the same interval, by process (psutil):
the worker's pool processes (the task and, for ours, the store's client side), its main
process, the database backends of the bench database, and the Redis server (shared: other
clients' load lands there too). CPU, unlike the rate, is little moved by the machine's
other load; it is where a checkpointed task's extra time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil
import psycopg
import redis

from bench import common

PROCRASTINATE_DSN = "PIPELINE_BENCH_PROCRASTINATE_DSN"
# A run whose raw Celery rounds differ by more than this (max - min over min) is noisy.
NOISY_SPREAD = 0.25


# CPU microseconds per task by process kind, per variant and round (drain_rate fills it).
CPU_KINDS = ("pool", "main", "database", "redis")
CPU: dict[str, list[dict[str, float]]] = {}


class CpuMeter:
    """CPU seconds of the worker (main, pool), the bench database's backends and Redis."""

    def __init__(self, worker_pid: int, database_url: str) -> None:
        self.main = psutil.Process(worker_pid)
        self.dsn = common.libpq_url(database_url)
        self.redis = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "redis-server"]

    def _backends(self) -> list[psutil.Process]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            pids = conn.execute(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        return [psutil.Process(pid) for (pid,) in pids if psutil.pid_exists(pid)]

    def read(self) -> dict[str, dict[int, float]]:
        """CPU seconds (user + system) of each process, by kind."""
        kinds = {
            "pool": self.main.children(recursive=True),
            "main": [self.main],
            "database": self._backends(),
            "redis": self.redis,
        }
        seconds: dict[str, dict[int, float]] = {}
        for kind, procs in kinds.items():
            seconds[kind] = {}
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    seconds[kind][p.pid] = t.user + t.system
        return seconds

    @staticmethod
    def per_task(
        start: dict[str, dict[int, float]], end: dict[str, dict[int, float]], n: int
    ) -> dict[str, float]:
        """Microseconds per task between two readings (a process that appeared meanwhile,
        e.g. a backend connecting, counts from zero)."""
        return {
            kind: sum(cpu - start[kind].get(pid, 0.0) for pid, cpu in end[kind].items()) / n * 1e6
            for kind in end
        }


# The fair race: (hand-written task, checkpointed task) per file size, in tasks_app.
RACE_TASKS = {"raw-load": "raw_load", "checkpointed-load": "ckpt_load"}


def race_variant(kind: str, lines: int) -> str:
    return f"{kind}-{lines}"


def race_split(variant: str) -> tuple[str, int] | None:
    """("raw-load", 100) for "raw-load-100"; None for the no-op variants."""
    kind, _, lines = variant.rpartition("-")
    return (kind, int(lines)) if kind in RACE_TASKS else None


def race_files(folder: pathlib.Path, lines: int, files: int) -> list[pathlib.Path]:
    """`files` JSON Lines files of `lines` small records each (written once per size)."""
    paths = []
    for f in range(files):
        path = folder / f"race-{lines}-{f}.jsonl"
        with path.open("w") as out:
            for i in range(lines):
                out.write(json.dumps({"value": i * 7 + f, "name": f"row {i} of file {f}"}) + "\n")
        paths.append(path)
    return paths


def drain_rate(
    variant: str,
    n: int,
    database_url: str,
    prefetch: int | None = None,
    root: pathlib.Path = common.ROOT,
    urls: list[str] | None = None,
) -> float:
    """`root`: the source tree the worker runs (another version's, for a before/after).
    `urls`: the files to send (the fair race's); else N unique no-op URLs."""
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

        race = race_split(variant)
        name = RACE_TASKS[race[0]] if race else variant.split("@")[0]
        task = {"raw": tasks_app.raw, "checkpointed": tasks_app.ckpt, "once": tasks_app.once}.get(
            name
        ) or getattr(tasks_app, name)
        run = uuid.uuid4().hex[:6]
        sent = urls if urls is not None else [f"file:///bench/{run}/{i}" for i in range(n)]
        with app.producer_or_acquire() as producer:
            for url in sent:
                task.apply_async(args=[url], queue=queue, producer=producer)
        r = redis.Redis.from_url(common.REDIS_URL)
        assert r.llen(queue) == len(sent), (r.llen(queue), len(sent))
        # The clock starts when the first message leaves the full queue: the command's reply
        # can take ~0.5 s, by when the worker may have drained a small queue, and the delay
        # before the worker acts on it varies as much (neither is the tasks' cost).
        meter = CpuMeter(proc.pid, database_url)
        app.control.add_consumer(queue, destination=[node], reply=False)
        deadline = time.monotonic() + 60
        while r.llen(queue) == len(sent):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker never consumed {queue}")
            time.sleep(0.0005)
        started = time.monotonic()
        cpu_start = meter.read()
        left = r.llen(queue) + r.hlen("unacked")  # the tasks the CPU reading covers
        while r.llen(queue) or r.hlen("unacked"):
            time.sleep(0.01)
        rate = len(sent) / (time.monotonic() - started)
        CPU.setdefault(variant, []).append(CpuMeter.per_task(cpu_start, meter.read(), left))
        return rate
    finally:
        common.stop(proc)


def race_written(database_url: str, urls: list[str], lines: int) -> None:
    """Every file of a race round wrote all its rows (else the round measured nothing)."""
    from bench import tasks_app

    with psycopg.connect(common.libpq_url(database_url)) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {tasks_app.RACE_TABLE} WHERE file_url = ANY(%s)", (urls,)
        ).fetchone()
    assert row is not None
    assert row[0] == len(urls) * lines, (row[0], len(urls) * lines)


def loads() -> tuple[float, float, float]:
    return os.getloadavg()


def noise_note(raw: list[float], load_log: list[tuple[int, str, float, float]]) -> str:
    """The run's trust line: the spread of raw Celery across rounds (noisy above 25 %) and
    the 1-minute load average before and after each round."""
    per_round: dict[int, list[float]] = {}
    for r, _v, before, after in load_log:
        per_round.setdefault(r, []).extend([before, after])
    rounds = "; ".join(
        f"round {r + 1}: {v[0]:.2f} -> {v[-1]:.2f} (max {max(v):.2f})"
        for r, v in sorted(per_round.items())
    )
    note = f"\nLoad average (1 min) before -> after each round: {rounds}.\n"
    if len(raw) < 2:
        return note + "Raw Celery ran one round: its spread, so this run's noise, is unknown.\n"
    spread = (max(raw) - min(raw)) / min(raw)
    if spread > NOISY_SPREAD:
        return note + (
            f"\n**NOISY: raw Celery's rounds differ by {spread:.0%} (> {NOISY_SPREAD:.0%}); the"
            " ratios of this run are not to be trusted: rerun on a quiet machine.**\n"
        )
    return (
        note + f"Raw Celery's rounds differ by {spread:.0%} (<= {NOISY_SPREAD:.0%}: not noisy).\n"
    )


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
    parser.add_argument(
        "--variants",
        default="raw,checkpointed,once,procrastinate,race",
        help="race: the fair race's rows (hand-written load against checkpointed, per --race)",
    )
    parser.add_argument(
        "--race",
        default="100:2000,10000:40",
        help="the fair race's sizes: LINES:FILES,... (files of LINES JSON lines, FILES tasks)",
    )
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
    # before bench.tasks_app is first imported (the race's table, below): celery-once reads it
    os.environ["PIPELINE_BROKER_URL"] = common.REDIS_URL
    variants = args.variants.split(",")
    sizes = [tuple(int(x) for x in part.split(":")) for part in args.race.split(",") if part]
    if "race" in variants:
        at = variants.index("race")
        variants[at : at + 1] = [
            race_variant(kind, lines) for lines, _files in sizes for kind in RACE_TASKS
        ]
    if args.before:
        variants.insert(
            variants.index("checkpointed") if "checkpointed" in variants else 0,
            "checkpointed@before",
        )
    load_log: list[tuple[int, str, float, float]] = []
    with contextlib.ExitStack() as stack:
        db = stack.enter_context(common.fresh_database())
        pdb = stack.enter_context(procrastinate_database()) if "procrastinate" in variants else ""
        bdb = stack.enter_context(common.fresh_database_at(args.before)) if args.before else ""
        folder = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="race-")))
        files: dict[int, list[pathlib.Path]] = {}
        if any(race_split(v) for v in variants):
            from bench import tasks_app

            with psycopg.connect(common.libpq_url(db), autocommit=True) as conn:
                conn.execute(tasks_app.RACE_DDL)
            files = {lines: race_files(folder, lines, n) for lines, n in sizes}

        def race(v: str, kind_lines: tuple[str, int]) -> Callable[[int], float]:
            def one(r: int) -> float:
                # the same files, new URLs each round (#fragment): every write is a new row
                urls = [f"{p.as_uri()}#{r}-{v}" for p in files[kind_lines[1]]]
                rate = drain_rate(v, len(urls), db, args.prefetch, urls=urls)
                race_written(db, urls, kind_lines[1])
                return rate

            return one

        def side(v: str) -> Callable[[int], float]:
            if v == "procrastinate":
                return lambda r: procrastinate_rate(args.tasks, pdb)
            if v == "checkpointed@before":
                return lambda r: drain_rate(v, args.tasks, bdb, args.prefetch, args.before)
            split = race_split(v)
            if split:
                return race(v, split)
            return lambda r: drain_rate(v, args.tasks, db, args.prefetch)

        def logged(v: str, run: Callable[[int], float]) -> Callable[[int], float]:
            def one(r: int) -> float:
                before = loads()[0]
                value = run(r)
                load_log.append((r, v, before, loads()[0]))
                return value

            return one

        results = common.interleave({v: logged(v, side(v)) for v in variants}, args.rounds)
    raw = common.median(results["raw"]) if "raw" in results else None
    rows = []
    for v in variants:
        split = race_split(v)
        if split:
            hand = results.get(race_variant("raw-load", split[1]))
            ratio = f"{common.median(results[v]) / common.median(hand):.2f}" if hand else "-"
        else:
            ratio = f"{common.median(results[v]) / raw:.2f}" if raw else "-"
        cpu = CPU.get(v)
        per_kind = [f"{common.median([c[k] for c in cpu]):,.0f}" if cpu else "-" for k in CPU_KINDS]
        rows.append([v, common.spread(results[v]), ratio, *per_kind])
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
    if files:
        md += (
            "\nThe fair race (rows `raw-load-N` / `checkpointed-load-N`, ratio to the"
            " hand-written `raw-load-N`): each task reads a JSON Lines file of N lines and"
            " writes its rows with `INSERT ... ON CONFLICT DO NOTHING` on a unique key, by hand"
            " in a plain Celery task (a SQLAlchemy engine per process) or through"
            " `@checkpointed` + `checkpoint.transaction()`; "
            + ", ".join(f"{n:,} files of {lines:,} lines" for lines, n in sizes)
            + " per round; figures are files per second.\n"
        )
    md += (
        "\nCPU per task (microseconds, median of the rounds): the worker's pool processes and"
        " main process, the bench database's backends, the Redis server (shared).\n"
    )
    columns = ["task", "tasks/s median [min..max]", "ratio to raw"]
    md += "\n" + common.table([*columns, *(f"CPU {k} us" for k in CPU_KINDS)], rows)
    md += noise_note(results.get("raw", []), load_log)
    if raw and "checkpointed" in results:
        ck = common.median(results["checkpointed"])
        md += f"\nTarget checkpointed/raw >= 0.85: {ck / raw:.2f} "
        md += "met" if ck / raw >= 0.85 else "NOT met"
        if "once" in results:
            once_ok = ck >= common.median(results["once"])
            md += f"; checkpointed >= celery-once: {'met' if once_ok else 'NOT met'}"
        md += "\n"
    for lines, _n in sizes:
        hand, ours = (results.get(race_variant(k, lines)) for k in RACE_TASKS)
        if hand and ours:
            ratio = common.median(ours) / common.median(hand)
            goal = 0.95 if lines <= 100 else 0.99
            md += (
                f"\nFair race at {lines:,} lines: checkpointed / hand-written = {ratio:.2f}"
                f" (target >= {goal}: {common.verdict(ratio >= goal)})\n"
            )
    name = f"tasks-prefetch{args.prefetch}" if args.prefetch else "tasks"
    common.save(
        name,
        md,
        {
            "results": results,
            "cpu_us_per_task": CPU,
            "tasks": args.tasks,
            "prefetch": args.prefetch,
            "load": load_log,
        },
    )


if __name__ == "__main__":
    main()
