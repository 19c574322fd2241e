"""Store ceiling: claim-and-complete pairs per second through `pipeline.open_store(url)`.

For each client count N, N processes (each its own store, unique URLs, released together by a
barrier) run claim + complete for a fixed duration, against `pgbench` running the same two
calls (pipeline_claim_v1, then pipeline_complete_v1 with the token captured by \\gset) with
N clients (`-c N -j N -T secs -n -M prepared`). Each run gets a fresh database. pgbench runs
with the store's own session setting (plan_cache_mode=force_custom_plan, through PGOPTIONS),
so both sides execute the same SQL under the same plans. The figure is pairs per second.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg

from bench import common

# The arguments the store passes (see PostgresStore.claim / complete with their defaults).
LEASE = 30.0
MAX_ATTEMPTS = 3
FILE_TYPE = "bench"
TASK_NAME = "bench.store"
WORKER = "bench-store"
# psycopg prepares a statement on its 5th execution; pgbench -M prepared does at once.
WARMUP_PAIRS = 6
# The store's own session option (PostgresStore._driver), given to pgbench too.
STORE_PGOPTIONS = "-c plan_cache_mode=force_custom_plan"

PGBENCH_SCRIPT = f"""\\set k random(1, 9000000000000000000)
SELECT * FROM pipeline_claim_v1('pgbench/' || :client_id || '/' || :k, '{WORKER}', {LEASE}, \
{MAX_ATTEMPTS}, '{FILE_TYPE}', '{TASK_NAME}', NULL, NULL) \\gset
SELECT pipeline_complete_v1('pgbench/' || :client_id || '/' || :k, :token, 0, 0, 0, NULL, NULL)
"""


def _store_process(
    url: str, prefix: str, seconds: float, barrier: Any, results: Any
) -> None:  # pragma: no cover - runs in the child
    import random

    import pipeline

    # Keys shaped like pgbench's ('pgbench/<client>/<random bigint>'), so both sides insert
    # at random places in the primary key, not at its right edge.
    rng = random.Random()
    store = pipeline.open_store(url)
    try:
        for i in range(WARMUP_PAIRS):  # connect and get the statements prepared
            key = f"{prefix}warm/{i}"
            claim = store.claim(
                key, WORKER, LEASE, max_attempts=MAX_ATTEMPTS, file_type=FILE_TYPE,
                task_name=TASK_NAME,
            )  # fmt: skip
            store.complete(key, claim.token)  # type: ignore[union-attr]
        barrier.wait()
        n = 0
        started = time.perf_counter()
        deadline = started + seconds
        while True:
            key = f"{prefix}{rng.randint(1, 9_000_000_000_000_000_000)}"
            claim = store.claim(
                key, WORKER, LEASE, max_attempts=MAX_ATTEMPTS, file_type=FILE_TYPE,
                task_name=TASK_NAME,
            )  # fmt: skip
            store.complete(key, claim.token)  # type: ignore[union-attr]
            n += 1
            if time.perf_counter() >= deadline:
                break
        results.put((n, time.perf_counter() - started))
    finally:
        store.close()


def store_rate(clients: int, seconds: float) -> float:
    """Pairs per second from `clients` processes, each with its own store."""
    ctx = multiprocessing.get_context("fork")
    with common.fresh_database() as url:
        barrier = ctx.Barrier(clients)
        results = ctx.Queue()
        procs = [
            ctx.Process(
                target=_store_process,
                args=(url, f"store/{p}/", seconds, barrier, results),
            )
            for p in range(clients)
        ]
        for proc in procs:
            proc.start()
        got = [results.get(timeout=seconds + 120) for _ in procs]
        for proc in procs:
            proc.join()
            if proc.exitcode != 0:
                raise RuntimeError(f"store process exited {proc.exitcode}")
        pairs = sum(n for n, _ in got)
        elapsed = sum(t for _, t in got) / len(got)
        with psycopg.connect(common.libpq_url(url)) as conn:
            done = conn.execute(
                "SELECT count(*) FROM file_checkpoints WHERE status = 'completed'"
            ).fetchone()[0]  # type: ignore[index]
        assert done == pairs + clients * WARMUP_PAIRS, (done, pairs)
        return pairs / elapsed


_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)


def pgbench_rate(clients: int, seconds: float, script: str) -> float:
    """Pairs per second of pgbench running the same two calls with `clients` clients."""
    with common.fresh_database() as url:
        env = dict(os.environ, PGOPTIONS=STORE_PGOPTIONS, PGAPPNAME="pgbench-pipeline")
        cmd = [
            "pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", str(clients),
            "-T", str(max(1, round(seconds))), "-f", script, *common.pg_cli_args(url),
        ]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pgbench exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        tps = _TPS.search(proc.stdout)
        failed = _FAILED.search(proc.stdout)
        if not tps or (failed and int(failed.group(1))):
            raise RuntimeError(f"pgbench output not understood or failures:\n{proc.stdout}")
        with psycopg.connect(common.libpq_url(url)) as conn:
            granted = conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'completed'), count(*)"
                " FROM file_checkpoints"
            ).fetchone()
        assert granted is not None
        assert granted[0] == granted[1] > 0, granted  # every claim completed
        return float(tps.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", default="1,2,4", help="client counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "claim_complete.sql")
        with open(script, "w") as handle:
            handle.write(PGBENCH_SCRIPT)
        sides: dict[str, Any] = {}
        for n in counts:
            sides[f"store c={n}"] = lambda r, n=n: store_rate(n, args.seconds)
            sides[f"pgbench c={n}"] = lambda r, n=n: pgbench_rate(n, args.seconds, script)
        results = common.interleave(sides, args.rounds)

    rows = []
    ratios: dict[int, float] = {}
    for n in counts:
        store, bench = results[f"store c={n}"], results[f"pgbench c={n}"]
        ratios[n] = common.median(store) / common.median(bench)
        per_round = [s / b for s, b in zip(store, bench, strict=True)]
        rows.append(
            [
                str(n),
                common.spread(store),
                common.spread(bench),
                f"{ratios[n]:.2f}",
                f"{min(per_round):.2f}..{max(per_round):.2f}",
                common.verdict(ratios[n] >= 0.60),
            ]
        )
    md = common.header(
        f"Store ceiling: claim + complete pairs/s, {args.seconds:g} s runs, {args.rounds} rounds"
    )
    md += (
        "\nEach process its own `pipeline.open_store(url)`, unique URLs, started by a barrier; "
        "pgbench runs the same two function calls (`-M prepared`, `\\gset` token, same "
        "`plan_cache_mode`), same client count. Fresh database per run.\n\n"
    )
    md += common.table(
        [
            "clients",
            "store pairs/s median [min..max]",
            "pgbench pairs/s median [min..max]",
            "ratio",
            "per-round ratios",
            "target >= 0.60",
        ],
        rows,
    )
    common.save(
        "store",
        md,
        {"results": results, "ratios": ratios, "seconds": args.seconds, "rounds": args.rounds},
    )


if __name__ == "__main__":
    main()
