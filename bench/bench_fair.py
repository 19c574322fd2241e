"""Fair sharing between batches: a small batch submitted after a big one, on real workers.

One `celery -A bench.fair_app worker -c C` (prefork); each file is claimed, sleeps S seconds
and is completed (bench/fair_app.py). A batch of BIG files is submitted (the Python path of
`pipeline submit`: batch row, registration, a message for each file that needs one), then a
batch of SMALL files.
Each case on a fresh database and an emptied queue:

* alone: the small batch by itself: its own work time (SMALL files at the worker's pace);
* no limit: the big batch without a concurrency limit: the small one waits behind it;
* limit (before): the big batch with `--concurrency L`, workers, schema and submit of
  `--before` (4a89027: every file's message sent at submit; a claim refused as `limited` came
  back at random within the batch's expected time to drain, 0021);
* limit: the same on this tree (0023: submit sends twice the limit and holds the rest; a
  refused claim holds its file and drops its message; each ending sends the next held file).

Reported: for the small batch, the time from its submit to its first start and to its last
completion (database clock); the claims refused as `limited` (each a Celery retry, written
down by the workers) per second from the big submit to the small batch's end. In the limited
cases, once every message of the big batch was taken once (the queue emptied, or SETTLE
seconds passed): the refused claims per second and the big batch's completions per second
(its limit allows at most L / S) in the WINDOW seconds after, then a second small batch
(`small later`), timed the same way.

    .venv/bin/python bench/bench_fair.py --big 20000   # the issue's: 20,000 + 200, limit 2
    .venv/bin/python bench/bench_fair.py               # `make bench`: 4,000 + 200
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg

from bench import common

QUEUE = "bench-fair"
TASK = "bench.fair"
os.environ["PIPELINE_BROKER_URL"] = common.REDIS_URL
os.environ["PIPELINE_QUEUE"] = QUEUE


@dataclasses.dataclass
class Case:
    label: str
    big: int
    limit: int | None
    root: pathlib.Path | None = None  # another tree's workers and schema (--before)


@dataclasses.dataclass
class Outcome:
    small: tuple[float, float]  # the small batch: submit to first start, to last completion
    refused_during: int  # claims refused from the big submit to the small batch's end
    during: float
    # limited cases: the refused claims and big completions in WINDOW seconds once every big
    # message was taken once, and then a second small batch's (first start, last completion)
    window: float = 0.0
    refused_window: int = 0
    big_done_window: int = 0
    small_later: tuple[float, float] | None = None
    load: tuple[float, float] = (0.0, 0.0)


def _database(case: Case) -> contextlib.AbstractContextManager[str]:
    if case.root is not None:
        return common.fresh_database_at(case.root, "pipeline_bench_fair_before")
    return common.fresh_database("pipeline_bench_fair")


def refused(folder: pathlib.Path, since: float, until: float) -> int:
    """Claims refused as `limited` between two times (epoch seconds), as the workers wrote
    them (bench/fair_app.py)."""
    count = 0
    for path in folder.glob("refused-*.txt"):
        count += sum(1 for line in path.read_text().split() if since <= float(line) < until)
    return count


class Probe:
    """Reads of the case's database: its clock, its batches."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(common.libpq_url(url), autocommit=True)

    def one(self, sql: str, *params: Any) -> Any:
        row = self.conn.execute(sql, params).fetchone()
        assert row is not None
        return row

    def now(self) -> Any:
        return self.one("SELECT clock_timestamp()")[0]

    def batch(self, name: str) -> tuple[int, Any, Any]:
        """Completed files, the first start and the last completion of batch `name`."""
        done, first, last = self.one(
            "SELECT count(*) FILTER (WHERE status = 'completed'), min(started_at),"
            " max(completed_at) FROM file_checkpoints WHERE batch_id = %s",
            name,
        )
        return int(done), first, last


@contextlib.contextmanager
def _worker(case: Case, url: str, folder: pathlib.Path, args: argparse.Namespace) -> Iterator[None]:
    env = common.env_for(
        url, QUEUE, PIPELINE_BENCH_FAIR_SLEEP=str(args.sleep), PIPELINE_BENCH_FAIR_DIR=str(folder)
    )
    if case.root is not None:
        env["PYTHONPATH"] = str(case.root)
    common.flush_redis()
    proc = common.start_worker(
        "bench.fair_app", QUEUE, env, "-c", str(args.concurrency), "--pool", "prefork",
        cwd=case.root or common.ROOT,
    )  # fmt: skip
    try:
        from bench import fair_app

        common.wait_ready(fair_app.app, timeout=120)
        yield
    finally:
        common.stop(proc)


def _submit(store: Any, sender: Any, name: str, count: int, limit: int | None) -> None:
    from pipeline.sources import producer

    urls = tuple(f"file:///bench/fair/{name}/{i:06d}" for i in range(count))
    request = producer.Request(
        batch_id=name,
        arguments=urls,
        task_name=TASK,
        fingerprints=False,
        concurrency=limit,
    )
    report = producer.submit_request(store, request, sender.send)
    if report.enqueued + getattr(report, "held", 0) != count:
        raise RuntimeError(f"{name}: {report.enqueued} of {count} enqueued")


def _submit_at(root: pathlib.Path, url: str, name: str, count: int, limit: int | None) -> None:
    """`_submit` by the code of another tree (--before), in a process of its own."""
    script = """
import sys, pipeline
from bench import bench_fair, fair_app
from pipeline.sender import Sender
url, name, count, limit = sys.argv[1:]
with Sender(fair_app.app) as sender:
    bench_fair._submit(
        pipeline.open_store(url), sender, name, int(count), None if limit == "-" else int(limit)
    )
"""
    env = dict(os.environ, PYTHONPATH=str(root))
    subprocess.run(
        [sys.executable, "-c", script, url, name, str(count), str(limit or "-")],
        check=True,
        cwd=root,
        env=env,
    )


def _until(ready: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready in {timeout:,.0f} s")
        time.sleep(0.2)


def _run_small(
    probe: Probe, submit: Any, name: str, args: argparse.Namespace
) -> tuple[float, float]:
    """Submit the small batch `name` and wait for it: seconds from its submit to its first
    start and to its last completion (database clock)."""
    submitted = probe.now()
    submit(name, args.small, None)
    _until(lambda: probe.batch(name)[0] == args.small, args.timeout)
    _, first, last = probe.batch(name)
    return (first - submitted).total_seconds(), (last - submitted).total_seconds()


def run_case(case: Case, args: argparse.Namespace) -> Outcome:
    import pipeline
    from bench import fair_app
    from pipeline.sender import Sender

    load_before = os.getloadavg()[0]
    with _database(case) as url, tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        probe = Probe(url)
        store = pipeline.open_store(url)
        try:
            with _worker(case, url, folder, args), Sender(fair_app.app) as sender:

                def submit(name: str, count: int, limit: int | None) -> None:
                    if case.root is not None:
                        _submit_at(case.root, url, name, count, limit)
                    else:
                        _submit(store, sender, name, count, limit)

                t0 = time.time()
                if case.big:
                    submit("big", case.big, case.limit)
                small = _run_small(probe, submit, "small", args)
                t1 = time.time()
                outcome = Outcome(
                    small=small, refused_during=refused(folder, t0, t1), during=t1 - t0
                )
                if case.limit:
                    # Every message of the big batch taken once (the queue emptied): from now
                    # on its refused files come back at the pace the claim gives them.
                    # (at most --settle seconds: retried messages pass through the queue too)
                    settle = time.monotonic() + args.settle
                    while common.queue_length(QUEUE) > args.concurrency:
                        if time.monotonic() > settle:
                            break
                        time.sleep(0.2)
                    t1, big1 = time.time(), probe.batch("big")[0]
                    time.sleep(args.window)
                    t2, big2 = time.time(), probe.batch("big")[0]
                    outcome.window = t2 - t1
                    outcome.refused_window = refused(folder, t1, t2)
                    outcome.big_done_window = big2 - big1
                    outcome.small_later = _run_small(probe, submit, "small-later", args)
        finally:
            store.close()
            probe.conn.close()
    outcome.load = (load_before, os.getloadavg()[0])
    print(f"  {case.label}: {outcome}", file=sys.stderr, flush=True)
    return outcome


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f}/s ({count:,} in {seconds:,.0f} s)" if seconds else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--big", type=int, default=4000, help="the issue's: 20000")
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--limit", type=int, default=2, help="the big batch's --concurrency")
    parser.add_argument("--sleep", type=float, default=0.02, help="seconds of work per file")
    parser.add_argument("--concurrency", type=int, default=4, help="the worker's -c")
    parser.add_argument("--window", type=float, default=15.0, help="seconds measured after")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument(
        "--settle", type=float, default=60.0, help="at most this long for the queue to empty"
    )
    parser.add_argument("--before", default="4a89027", help="a commit before 0023")
    parser.add_argument(
        "--cases",
        default="no-limit,before,limit",
        help="which cases after `alone` (comma-separated): no-limit, before, limit",
    )
    args = parser.parse_args()

    chosen = set(args.cases.split(","))
    cases = [Case("alone", 0, None)]
    if "no-limit" in chosen:
        cases.append(Case("no limit", args.big, None))
    root = None
    if "before" in chosen:
        from bench.bench_batches import before_tree

        root = before_tree(args.before)
        for name in ("fair_app.py", "bench_fair.py"):
            shutil.copy(common.ROOT / "bench" / name, root / "bench" / name)
        cases.append(Case(f"limit {args.limit} ({args.before})", args.big, args.limit, root))
    if "limit" in chosen:
        cases.append(Case(f"limit {args.limit}", args.big, args.limit))
    load_before = os.getloadavg()
    try:
        outcomes = [(case, run_case(case, args)) for case in cases]
    finally:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()
    own = outcomes[0][1].small[1]

    def small(figures: tuple[float, float] | None) -> str:
        if figures is None:
            return "-"
        return f"{figures[0]:,.2f} s / {figures[1]:,.2f} s ({figures[1] - own:+,.2f} s)"

    md = common.header("Fair sharing: a small batch after a big one")
    md += (
        f"\nOne worker `-c {args.concurrency}`; files of {args.sleep:g} s of work. {args.big:,} "
        f"files in batch `big` submitted, then at once {args.small:,} in batch `small`; `limit`: "
        f"the big batch submitted with `--concurrency {args.limit}` (at most {args.limit} of "
        f"its files at once: {args.limit / args.sleep:,.0f} files/s at most). In the limited "
        f"cases, once every message of the big batch was taken once (the queue emptied), the "
        f"claims refused and the big batch's completions are counted for {args.window:g} s, "
        f"then another {args.small:,} files are submitted (`small later`). Times: from the "
        f"submit to the first start / to the last completion (past the small batch's own work "
        f"alone). Refused claims: those answered `limited` (Celery retries). Load average "
        f"(1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}, on a machine shared "
        "with other work.\n\n"
    )
    md += common.table(
        [
            "case",
            "small: first start / last completion",
            "claims refused, big submit to small done",
            "claims refused, queue emptied",
            "big completed/s, same window",
            "small later: first start / last completion",
        ],
        [
            [
                case.label,
                small(o.small),
                _rate(o.refused_during, o.during) if case.big else "-",
                _rate(o.refused_window, o.window),
                f"{o.big_done_window / o.window:,.0f}/s" if o.window else "-",
                small(o.small_later),
            ]
            for case, o in outcomes
        ],
    )
    md += (
        f"\nThe small batch's own work: {own:,.2f} s (`alone`). Load average per case, before "
        "/ after: "
        + "; ".join(f"{c.label} {o.load[0]:.2f} / {o.load[1]:.2f}" for c, o in outcomes)
        + ".\n"
    )
    common.save(
        "fair",
        md,
        {
            "args": vars(args),
            "cases": [{"label": c.label, **dataclasses.asdict(o)} for c, o in outcomes],
            "load": [load_before, load_after],
        },
    )


if __name__ == "__main__":
    main()
