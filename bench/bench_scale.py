"""Scale: `pipeline status`, a metrics refresh and scrape, the sweep and its prune, and a
resubmit of every URL, on a big table (1M rows by default; `--rows 10000000` for issue 21).

file_checkpoints is loaded by COPY (psycopg) with N rows in a few batches, mostly completed,
some dead / pending / failed / processing (half of those with an expired lease), plus one
file_attempts row per started file, as a table that size would have; then VACUUM ANALYZE (as
autovacuum would have done). Measured:

* `pipeline status` as a subprocess: wall time, and net of `pipeline --help` (interpreter
  start and imports), interleaved round by round; `store.overview()` in-process;
* `CheckpointCollector.refresh()` (what the exporter does every interval) and one HTTP scrape
  of `pipeline.ops.metrics.serve` (the scrape serves the last snapshot by design);
* `pipeline submit --from FILE` of the same N URLs (all registered already: nothing is
  enqueued), peak RSS of the subprocess (GNU time -v, cross-checked by psutil polling).

Targets: each timing under 200 ms; submit peak RSS under 150 MB. EXPLAIN ANALYZE of the
queries behind status and the metrics is kept with the results.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil
import psycopg

from bench import common

TARGET_S = 0.200
TARGET_RSS_MB = 150.0
COLUMNS = (
    "file_url, file_type, status, records_total, records_filtered, records_persisted, "
    "processing_time_ms, error_message, attempt, max_attempts, processed_by, started_at, "
    "completed_at, token, lease_seconds, lease_expires_at, task_name, batch_id, created_at, "
    "updated_at"
)
ATTEMPT_COLUMNS = "token, file_url, generation, attempt, worker, started_at, ended_at, outcome"
N = "\\N"


def url_of(i: int) -> str:
    return f"file:///bench/scale/{i:07d}.jsonl"


def status_of(i: int) -> str:
    """Per mille: 950 completed, 20 dead, 15 pending, 8 failed, 7 processing."""
    m = (i * 7919) % 1000  # spread the minorities over the key range
    if m < 950:
        return "completed"
    if m < 970:
        return "dead"
    if m < 985:
        return "pending"
    if m < 993:
        return "failed"
    return "processing"


def load(url: str, rows: int, batches: int) -> dict[str, float]:
    """COPY the rows in key order (as a sorted list would arrive); returns timings."""
    timings: dict[str, float] = {}
    with psycopg.connect(common.libpq_url(url), autocommit=True) as conn:
        now = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        # One string per minute of the last day, for started/completed/updated times.
        minutes = [(now - dt.timedelta(minutes=k)).isoformat() for k in range(1440)]
        recent = (now - dt.timedelta(seconds=5)).isoformat()
        future = (now + dt.timedelta(hours=1)).isoformat()
        past = (now - dt.timedelta(minutes=10)).isoformat()
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy(f"COPY file_checkpoints ({COLUMNS}) FROM STDIN") as cp:
            block: list[str] = []
            for i in range(rows):
                status = status_of(i)
                t = minutes[(i * 31) % 1440]
                batch = f"scale-{i * batches // rows}"
                if status == "completed":
                    done_at = recent if i % 500 == 0 else t
                    fields = (
                        "events", status, "40", "2", "38", "120", N, "1", "3", "w1@vm:101",
                        t, done_at, str(i + 1), "30", N,
                    )  # fmt: skip
                elif status == "dead":
                    fields = (
                        "events", status, "0", "0", "0", "0", "boom: bad input", "3", "3",
                        "w1@vm:101", t, N, str(i + 1), "30", N,
                    )  # fmt: skip
                elif status == "failed":
                    fields = (
                        "events", status, "0", "0", "0", "0", "boom: retry", "1", "3",
                        "w1@vm:101", t, N, str(i + 1), "30", N,
                    )  # fmt: skip
                elif status == "processing":
                    lease = future if i % 2 else past
                    fields = (
                        "events", status, "0", "0", "0", "0", N, "1", "3", "w2@vm:202", t, N,
                        str(i + 1), "30", lease,
                    )  # fmt: skip
                else:  # pending
                    fields = ("events", status, "0", "0", "0", "0", N, "0", "3", N, N, N, N, N, N)
                block.append("\t".join((url_of(i), *fields, "pipeline.ingest", batch, t, t)))
                if len(block) >= 10_000:
                    cp.write("\n".join(block) + "\n")
                    block.clear()
            if block:
                cp.write("\n".join(block) + "\n")
        timings["copy_checkpoints_s"] = time.perf_counter() - started

        started = time.perf_counter()
        outcome = {"completed": "completed", "dead": "failed", "failed": "failed"}
        # Every attempt row's file_url is loaded above, so the foreign key's per-row check
        # (a trigger) is skipped for this COPY when allowed (superuser): it halves the load.
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET session_replication_role = replica")
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY file_attempts ({ATTEMPT_COLUMNS}) FROM STDIN") as cp,
        ):
            block = []
            for i in range(rows):
                status = status_of(i)
                if status == "pending":
                    continue
                t = minutes[(i * 31) % 1440]
                ended = N if status == "processing" else t
                result = outcome.get(status, "running")
                attempt = "3" if status == "dead" else "1"
                block.append(
                    f"{i + 1}\t{url_of(i)}\t1\t{attempt}\tw1@vm:101\t{t}\t{ended}\t{result}"
                )
                if len(block) >= 10_000:
                    cp.write("\n".join(block) + "\n")
                    block.clear()
            if block:
                cp.write("\n".join(block) + "\n")
        conn.execute("RESET session_replication_role")
        conn.execute("SELECT setval('file_checkpoints_token_seq', %s)", (rows + 1,))
        timings["copy_attempts_s"] = time.perf_counter() - started

        started = time.perf_counter()
        conn.execute("VACUUM (ANALYZE) file_checkpoints")
        conn.execute("VACUUM (ANALYZE) file_attempts")
        timings["vacuum_analyze_s"] = time.perf_counter() - started
        size = conn.execute(
            "SELECT pg_total_relation_size('file_checkpoints')"
            " + pg_total_relation_size('file_attempts')"
        ).fetchone()[0]  # type: ignore[index]
        timings["tables_mib"] = size / 2**20
    return timings


def explain(url: str) -> dict[str, dict[str, Any]]:
    """EXPLAIN (ANALYZE, BUFFERS) of the queries behind status and the metrics refresh."""
    from pipeline.store.postgres import driver_queries

    queries = driver_queries()
    from pipeline.store.postgres.operations import DURATION_BOUNDS

    params = {
        "batch_id": None,
        "limit": 10,
        "window": 900.0,
        "bounds": list(DURATION_BOUNDS),
    }
    found: dict[str, dict[str, Any]] = {}
    with psycopg.connect(common.libpq_url(url), autocommit=True) as conn:
        conn.execute("SET plan_cache_mode = force_custom_plan")
        for name in (
            "summary",
            "activity",
            "dead",
            "ops_state",
            "ops_batches",
            "ops_attempts",
            "ops_pickup",
        ):
            rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + queries[name], params).fetchall()
            plan = "\n".join(r[0] for r in rows)
            took = re.search(r"Execution Time: ([0-9.]+) ms", plan)
            found[name] = {
                "execution_ms": float(took.group(1)) if took else None,
                "nodes": plan_nodes(plan),
                "plan": plan,
            }
    return found


_NODE = re.compile(r"^\s*(?:->\s*)?(\S[^(]*?)\s+\(cost=.*actual time=\S+ rows=(\d+) loops=(\d+)")


def plan_nodes(plan: str) -> str:
    """The plan's nodes with the rows each produced, top first: where the time goes at a glance."""
    nodes = []
    for line in plan.splitlines():
        if found := _NODE.match(line):
            name, rows, loops = found.group(1), int(found.group(2)), int(found.group(3))
            nodes.append(f"{name} ({rows * loops:,} rows)")
    return " <- ".join(nodes)


def timed(fn: Any, rounds: int) -> list[float]:
    fn()  # warm: connect, first plans
    values = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        values.append(time.perf_counter() - started)
    return values


def peak_rss_run(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run cmd under GNU time -v (if installed) while polling its RSS with psutil."""
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    full = [gnu_time, "-v", *cmd] if gnu_time else cmd
    polled = 0
    started = time.perf_counter()
    proc = subprocess.Popen(
        full, env=env, cwd=common.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out: dict[str, str] = {}

    def drain(name: str, stream: Any) -> None:
        out[name] = stream.read()

    readers = [
        threading.Thread(target=drain, args=("stdout", proc.stdout)),
        threading.Thread(target=drain, args=("stderr", proc.stderr)),
    ]
    for reader in readers:
        reader.start()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            # the pipeline process itself (under GNU time it is time's child)
            polled = max(
                polled, max(p.memory_info().rss for p in tree if p.pid != proc.pid or not gnu_time)
            )
        except (psutil.NoSuchProcess, ValueError):
            pass
        time.sleep(0.05)
    took = time.perf_counter() - started
    for reader in readers:
        reader.join()
    # Exit 1 is expected here: the table holds dead files, and submit reports a batch that
    # contains one as failed. Anything else (or a refused line) is a real error.
    refused = re.search(r"(\d+) refused", out.get("stderr", ""))
    if proc.returncode not in (0, 1) or not refused or int(refused.group(1)):
        raise RuntimeError(f"submit exited {proc.returncode}:\n{out.get('stderr', '')[-3000:]}")
    stderr = out.get("stderr", "")
    reported = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return {
        "wall_s": took,
        "gnu_time_peak_mb": int(reported.group(1)) / 1024 if reported else None,
        "psutil_peak_mb": polled / 2**20,
        "stderr": stderr,
    }


def resubmit(
    exe: str, env: dict[str, str], tmp: str, rows: int, queue: str
) -> tuple[dict[str, Any], int]:
    """`pipeline submit --from FILE` of the same URLs (all known); its run and what it enqueued."""
    # The same URLs again (plain paths, as a list would give them): all already known.
    path = os.path.join(tmp, "urls.txt")
    with open(path, "w") as handle:
        for i in range(rows):
            handle.write(f"/bench/scale/{i:07d}.jsonl\n")
    common.flush_redis()
    print(f"  resubmitting {rows:,} URLs ...", file=sys.stderr, flush=True)
    sub = peak_rss_run(
        [exe, "submit", "--from", path, "--batch", "scale-again", "--no-fingerprint"], env
    )
    summary = re.search(r"(\d+) files, (\d+) enqueued", sub["stderr"])
    assert summary, sub["stderr"][-2000:]
    assert int(summary.group(1)) == rows, sub["stderr"][-2000:]
    enqueued = int(summary.group(2)) + common.queue_length(queue)
    common.flush_redis()
    return sub, enqueued


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5, help="timed repetitions of each read")
    parser.add_argument(
        "--no-resubmit", action="store_true", help="skip the resubmit of every URL (long at 10M)"
    )
    args = parser.parse_args()
    import pipeline
    from pipeline.ops import metrics

    data: dict[str, Any] = {"rows": args.rows, "batches": args.batches}
    exe = common.pipeline_executable()
    with common.fresh_database() as db, tempfile.TemporaryDirectory() as tmp:
        print(f"  loading {args.rows:,} rows ...", file=sys.stderr, flush=True)
        data["load"] = load(db, args.rows, args.batches)
        print(f"  loaded: {data['load']}", file=sys.stderr, flush=True)
        queue = f"bench-scale-{uuid.uuid4().hex[:6]}"
        env = common.env_for(db, queue, COLUMNS="200")

        cli = common.interleave(
            {
                "pipeline --help": lambda r: common.timed_run([exe, "--help"], env)[0] * 1000,
                "pipeline status": lambda r: common.timed_run([exe, "status"], env)[0] * 1000,
            },
            args.rounds,
        )
        help_s = [v / 1000 for v in cli["pipeline --help"]]
        status_s = [v / 1000 for v in cli["pipeline status"]]
        net_s = [s - h for s, h in zip(status_s, help_s, strict=True)]

        store = pipeline.open_store(db)
        overview_s = timed(lambda: store.overview(), args.rounds)
        collector = metrics.CheckpointCollector(store)
        refresh_s = timed(collector.refresh, args.rounds)
        port = common.free_port()
        _, stop = metrics.serve(store, port=port, addr="127.0.0.1", interval=3600)

        def scrape() -> None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                body = resp.read().decode()
            assert "pipeline_files{" in body, body[:500]

        scrape_s = timed(scrape, args.rounds)
        stop.set()
        data["explain"] = explain(db)
        # The sweep at this size, after the reads (it changes rows): one round as a worker's
        # sweep runs it (expired claims handed back, up to 1,000 a round; waiting rows looked
        # at), then the prune a sweep does with PIPELINE_PRUNE_AFTER set (10 deletes of 5,000
        # at most; here each file has one attempt, kept: the cost of looking).
        sweep_s = timed(lambda: store.reap(waiting_seconds=300.0), args.rounds)
        prune_s = timed(lambda: store.prune(3600.0, keep=1, max_batches=10), args.rounds)
        store.close()

        sub: dict[str, Any] = {"wall_s": None, "gnu_time_peak_mb": None, "psutil_peak_mb": None}
        enqueued = None
        if not args.no_resubmit:
            sub, enqueued = resubmit(exe, env, tmp, args.rows, queue)

    peak = sub["gnu_time_peak_mb"] or sub["psutil_peak_mb"] or 0.0
    data.update(
        help_s=help_s,
        status_s=status_s,
        status_net_s=net_s,
        overview_s=overview_s,
        refresh_s=refresh_s,
        scrape_s=scrape_s,
        sweep_s=sweep_s,
        prune_s=prune_s,
        submit_wall_s=sub["wall_s"],
        submit_peak_mb_gnu_time=sub["gnu_time_peak_mb"],
        submit_peak_mb_psutil=sub["psutil_peak_mb"],
        submit_enqueued=enqueued,
    )

    def row(what: str, values: list[float], target: bool = True) -> list[str]:
        ok = common.verdict(common.median(values) < TARGET_S) if target else "-"
        return [what, common.ms_spread(values), ok]

    load_t = data["load"]
    md = common.header(f"Scale: {args.rows:,} checkpoint rows, {args.batches} batches")
    md += (
        f"\nLoaded by COPY in {load_t['copy_checkpoints_s']:.1f} s "
        f"(+ {load_t['copy_attempts_s']:.1f} s for file_attempts, "
        f"{load_t['vacuum_analyze_s']:.1f} s VACUUM ANALYZE; "
        f"{load_t['tables_mib']:,.0f} MiB). 95 % completed, 2 % dead, 1.5 % pending, 0.8 % "
        f"failed, 0.7 % processing. {args.rounds} timed runs each, after one warm-up.\n\n"
    )
    md += common.table(
        ["what", "median [min..max]", "target < 200 ms"],
        [
            row("`pipeline --help` (interpreter start baseline)", help_s, target=False),
            row("`pipeline status` (wall)", status_s, target=False),
            row("`pipeline status` (net of start-up)", net_s),
            row("`store.overview()` in-process", overview_s),
            row("`CheckpointCollector.refresh()`", refresh_s),
            row("HTTP scrape of /metrics (serves the last snapshot)", scrape_s),
            row("a sweep round (`store.reap`, waiting 300 s)", sweep_s),
            row("the sweep's prune round (`store.prune`, 10 x 5,000 at most)", prune_s),
        ],
    )
    md += "\n" + common.table(
        ["query (EXPLAIN ANALYZE, all batches)", "execution", "plan nodes (rows out)"],
        [[name, f"{e['execution_ms']:,.1f} ms", e["nodes"]] for name, e in data["explain"].items()],
    )
    if enqueued is None:
        md += "\nThe resubmit of every URL was skipped (`--no-resubmit`).\n"
    else:
        md += (
            f"\n`pipeline submit --from FILE` of the same {args.rows:,} URLs (all known, "
            f"{enqueued} enqueued): {sub['wall_s']:,.1f} s, peak RSS {peak:,.0f} MB "
            f"(GNU time: {sub['gnu_time_peak_mb'] or float('nan'):,.0f} MB, psutil polling: "
            f"{sub['psutil_peak_mb']:,.0f} MB). Target < {TARGET_RSS_MB:.0f} MB: "
            f"{common.verdict(peak < TARGET_RSS_MB)}; nothing enqueued: "
            f"{common.verdict(enqueued == 0)}\n"
        )
    common.save("scale", md, data)


if __name__ == "__main__":
    main()
