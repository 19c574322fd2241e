"""The fair race's pool-process cost in instructions, which the machine's other load does not move.

bench_tasks.py reports the CPU time of the worker's pool processes per file; on two shared cores
that figure moves by several percent from run to run, more than the gap it is meant to show
(issue 24: +8.5 ms per 10,000-line file checkpointed, 5 %). Here a real prefork worker
(bench.tasks_app's `raw_load` and `ckpt_load`, the project's settings) runs under valgrind's
callgrind, and every task is cut out of the count: the worker's own module (this one, `-A
bench.profile_race`) calls os.getpgrp() at each task's start and end, and callgrind dumps its
counters there (`--dump-before=os_getpgrp`; nothing else in the worker calls it). So each task's
instructions (all the pool process's threads: the lease keeper and the deadline watcher count
too) and each gap between two tasks (Celery's work around them) are counted apart, and with
them the calls of the socket system calls (send, poll, recv) made meanwhile.

`--mode separate` (the default) runs each kind in a fresh worker of its own, as bench_tasks.py
does; `--mode interleaved` runs both kinds alternately in one worker of one pool process, so
both see the same process. Needs valgrind (`apt-get install valgrind`) and a Python with
symbols (pyenv's has them). About 3 minutes per worker for 10 files of 10,000 lines.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ORDER = "PIPELINE_PROFILE_RACE_ORDER"  # set for the worker: where it writes which task ran

if os.environ.get(ORDER):  # imported by the worker under callgrind (`-A bench.profile_race`)
    from celery.signals import task_postrun, task_prerun

    from bench import tasks_app  # noqa: F401  (the race's tasks)
    from pipeline import app

    # billiard gives a pool process 4 s to start; under callgrind it takes longer
    app.conf.worker_proc_alive_timeout = 900

    @task_prerun.connect
    def _start(**_: object) -> None:
        os.getpgrp()  # callgrind dumps here: the gap before this task ends

    @task_postrun.connect
    def _end(task: object = None, **_: object) -> None:
        os.getpgrp()  # ... and here: this task ends
        with open(os.environ[ORDER], "a") as out:
            out.write(f"{os.getpid()} {getattr(task, 'name', '?')}\n")


SYSCALLS = ("send", "poll", "recv")
KINDS = {"raw_load": "hand-written", "ckpt_load": "checkpointed"}  # tasks_app's names
LABELS = {"bench.raw_load": "hand-written", "bench.checkpointed_load": "checkpointed"}


def parse_dump(path: pathlib.Path) -> tuple[int, collections.Counter[str]]:
    """A dump's instruction total, and the calls made in it per called function."""
    names: dict[str, str] = {}
    calls: collections.Counter[str] = collections.Counter()
    total = 0
    callee = ""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            total = int(line.split()[1])
        elif line.startswith("cfn="):
            m = re.match(r"\((\d+)\)(?: (.*))?", line[4:])
            if m and m.group(2):
                names[m.group(1)] = m.group(2)
            callee = names.get(m.group(1), line[4:]) if m else line[4:]
        elif line.startswith("fn="):
            m = re.match(r"\((\d+)\) (.*)", line[3:])
            if m:
                names[m.group(1)] = m.group(2)
        elif line.startswith("calls="):
            calls[callee] += int(line[6:].split()[0])
    return total, calls


def run_worker(
    db: str, files: list[pathlib.Path], kinds: list[str], out: pathlib.Path, conc: int
) -> list[tuple[str, str]]:
    """One worker under callgrind drains `kinds` (one task per file, in that order)."""
    import redis

    from bench import common, tasks_app
    from pipeline import app

    queue = f"profile-race-{uuid.uuid4().hex[:6]}"
    order = out / "order.txt"
    env = {**common.env_for(db, queue), ORDER: str(order), "PYTHONHASHSEED": "0"}
    common.flush_redis()
    cmd = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p",
        "--dump-before=os_getpgrp", sys.executable, "-m", "celery", "-A", "bench.profile_race",
        "worker", "-Q", queue, "-n", f"{queue}@%h", "--without-gossip", "--without-mingle",
        "--without-heartbeat", "-l", "warning", "-c", str(conc), "--pool", "prefork",
        "--prefetch-multiplier", "1",
    ]  # fmt: skip
    log = (out / "worker.log").open("w")
    proc = subprocess.Popen(
        cmd, env=env, cwd=common.ROOT, start_new_session=True, stdout=log, stderr=log
    )
    try:
        common.wait_ready(app, timeout=900)
        run = uuid.uuid4().hex[:6]
        urls = [f"{f.as_uri()}#{run}-{i}" for i, f in enumerate(files)]
        for url, kind in zip(urls, kinds, strict=True):
            getattr(tasks_app, kind).apply_async(args=[url], queue=queue)
        deadline = time.monotonic() + 3600
        while len(order.read_text().splitlines() if order.exists() else []) < len(kinds):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the worker under callgrind did not finish: see {out}")
            time.sleep(2)
        redis.Redis.from_url(common.REDIS_URL).close()
    finally:
        common.stop(proc)
        log.close()
    return [tuple(line.split()) for line in order.read_text().splitlines()]  # type: ignore[misc]


def per_task(out: pathlib.Path, order: list[tuple[str, str]]) -> dict[str, dict[str, list[float]]]:
    """Instructions of each task and of the gap before it, by task name, from the dumps of
    each pool process (dump 1: its start until its first task; then gap, task, gap, ...)."""
    found: dict[str, dict[str, list[float]]] = {}
    for pid in dict.fromkeys(p for p, _ in order):
        names = [n for p, n in order if p == pid]
        dumps = sorted(out.glob(f"cg.{pid}.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
        parsed = [parse_dump(d) for d in dumps]
        seen: set[str] = set()
        for i, name in enumerate(names):
            task_total, task_calls = parsed[2 * i + 1]
            row = found.setdefault(name, collections.defaultdict(list))
            row["later" if name in seen else "first"].append(task_total)
            seen.add(name)
            if i > 0:
                row["gap"].append(parsed[2 * i][0])
            for call in SYSCALLS:
                row[call].append(task_calls[call])
    return found


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--tasks", type=int, default=10, help="files per kind")
    parser.add_argument("--mode", choices=("separate", "interleaved"), default="separate")
    parser.add_argument("--concurrency", type=int, default=2, help="separate mode only")
    parser.add_argument("--keep", type=pathlib.Path, help="keep the dumps in this folder")
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("valgrind is needed: apt-get install valgrind")
    from bench import bench_tasks, common, tasks_app
    from pipeline import app

    app.conf.broker_url = common.REDIS_URL
    os.environ["PIPELINE_BROKER_URL"] = common.REDIS_URL
    import psycopg

    results: dict[str, dict[str, list[float]]] = {}
    with common.fresh_database() as db, tempfile.TemporaryDirectory(prefix="race-") as tmp:
        folder = pathlib.Path(tmp)
        with psycopg.connect(common.libpq_url(db), autocommit=True) as conn:
            conn.execute(tasks_app.RACE_DDL)
        files = bench_tasks.race_files(folder, args.lines, 2 * args.tasks)
        if args.mode == "separate":
            plans = [([kind] * args.tasks, args.concurrency) for kind in KINDS]
        else:
            plans = [(list(KINDS) * args.tasks, 1)]
        for n, (kinds, conc) in enumerate(plans):
            out = (args.keep or folder) / f"worker-{n}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            order = run_worker(db, files[: len(kinds)], kinds, out, conc)
            results.update(per_task(out, order))
    print(
        f"\nInstructions per task (millions), {args.lines:,}-line files, {args.tasks} per kind,"
        f" mode {args.mode}" + (f", -c {args.concurrency}" if args.mode == "separate" else "")
    )
    print("| task | first task of its kind in a process | later tasks (mean) | gap before a task |"
          " send / poll / recv per task |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, row in results.items():
        kind = LABELS.get(name, name)
        calls = " / ".join(f"{mean(row[c]):,.0f}" for c in SYSCALLS)
        print(
            f"| {kind} ({name}) | {mean(row['first']) / 1e6:,.1f} |"
            f" {mean(row['later']) / 1e6:,.2f} | {mean(row['gap']) / 1e6:,.3f} | {calls} |"
        )


if __name__ == "__main__":
    main()
