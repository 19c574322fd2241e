"""Recovery: from SIGKILL mid-task to the file completed again, on the database's clock.

Two `celery -A pipeline worker` (prefork -c 2, with
PIPELINE_TASK_MODULES=tests.support.celery_tasks) run `tests.sink` (its lease is
PIPELINE_TEST_LEASE) on one queue, with `celery -A pipeline beat` sending the reaper every
PIPELINE_REAP_INTERVAL seconds. One file `...?sleep=S&sleep_until=2` is sent: its first
attempt sleeps S seconds inside its output transaction, a second attempt does not (so the
figure is the recovery, not the task's own work). Once it is claimed and a second into its
sleep, either

* worker kill: the whole worker holding it (main process and pool, its process group) is
  SIGKILLed. Redis would hand its unacked message back only after visibility_timeout; the
  reaper sees the lease expire and re-enqueues, the other worker completes the file.
  Target: <= lease + 5 s.
* child kill: only the pool process running it is SIGKILLed. The worker's main process
  releases the claim at once (CheckpointRequest) and the message is redelivered.
  Target: <= 3 s.

The figure is completed_at - clock_timestamp() read from the database just before the kill.
Each round also checks the file ran exactly once to completion: attempts (1 lost,
2 completed) and one sink row.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil
import psycopg

from bench import common

CHILD_TARGET_S = 3.0
READY_TIMEOUT = 60.0


class Cluster:
    """The workers and beat of this benchmark, all in their own process groups."""

    def __init__(self, db: str, lease: float, reap_interval: float, tmp: pathlib.Path) -> None:
        from tests.support.celery_tasks import SINK_DDL

        self.db = db
        self.tmp = tmp
        self.queue = f"bench-recovery-{uuid.uuid4().hex[:6]}"
        self.env = common.env_for(
            db,
            self.queue,
            PIPELINE_TASK_MODULES="tests.support.celery_tasks",
            PIPELINE_TEST_LEASE=f"{lease:g}",
            PIPELINE_REAP_INTERVAL=f"{reap_interval:g}",
            PYTHONUNBUFFERED="1",
        )
        self.conn = psycopg.connect(common.libpq_url(db), autocommit=True)
        self.conn.execute(SINK_DDL)
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.others: list[subprocess.Popen[bytes]] = []

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.tmp / f"{name}.log").open("ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "celery", *argv],
                env=self.env,
                cwd=common.ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self, name: str) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.tmp / f"{name}.log").read_text(errors="replace")
        return ""

    def start_worker(self) -> str:
        name = f"w{len(self.workers) + 1}-{uuid.uuid4().hex[:4]}"
        self.workers[name] = self._spawn(
            name,
            [
                "-A", "pipeline", "worker", "--pool", "prefork", "-c", "2",
                "-Q", self.queue, "-n", f"{name}@%h", "--without-gossip", "--without-mingle",
                "-l", "info",
            ],
        )  # fmt: skip
        return name

    def wait_ready(self, names: list[str]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        pending = set(names)
        while pending:
            for name in list(pending):
                if self.workers[name].poll() is not None:
                    raise RuntimeError(f"worker {name} exited:\n{self.log(name)[-3000:]}")
                if " ready." in self.log(name):
                    pending.discard(name)
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers {sorted(pending)} not ready")
            time.sleep(0.1)

    def start_beat(self) -> None:
        beat = self._spawn(
            "beat",
            ["-A", "pipeline", "beat", "-s", str(self.tmp / "beat-schedule"),
             "--pidfile", str(self.tmp / "beat.pid"), "-l", "info"],
        )  # fmt: skip
        self.others.append(beat)
        deadline = time.monotonic() + READY_TIMEOUT
        while "Sending due task pipeline-reap" not in self.log("beat"):
            if beat.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"beat did not start:\n{self.log('beat')[-3000:]}")
            time.sleep(0.1)

    def scalar(self, sql: str, *params: Any) -> Any:
        row = self.conn.execute(sql, params).fetchone()
        return row[0] if row else None

    def wait_for(self, sql: str, *params: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.scalar(sql, *params)
            if value:
                return value
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.05)

    def owner(self, processed_by: str) -> tuple[str, int]:
        """The worker name and pool pid of a checkpoint's `node@host:pid`."""
        node, _, pid = processed_by.rpartition(":")
        for name in self.workers:
            if node.startswith(f"{name}@"):
                children = [p.pid for p in psutil.Process(self.workers[name].pid).children()]
                if int(pid) not in children:
                    raise RuntimeError(f"{pid} is not a pool process of {name}: {children}")
                return name, int(pid)
        raise RuntimeError(f"no worker of ours is {processed_by!r}")

    def close(self) -> None:
        for proc in [*self.workers.values(), *self.others]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.conn.close()


def recovery(
    cluster: Cluster, mode: str, sleep: float, lease: float, extra: dict[str, Any]
) -> float:
    from tests.support.celery_tasks import sink

    url = f"file:///bench/recovery/{uuid.uuid4().hex[:8]}/{mode}?sleep={sleep:g}&sleep_until=2"
    sink.apply_async(args=[url], queue=cluster.queue)
    processed_by = cluster.wait_for(
        "SELECT processed_by FROM file_checkpoints WHERE file_url = %s"
        " AND status = 'processing' AND attempt = 1",
        url,
        timeout=60,
        what=f"{url} to be claimed",
    )
    name, child = cluster.owner(processed_by)
    time.sleep(min(1.0, sleep / 2))  # well inside the task's sleep
    killed_at = cluster.scalar("SELECT clock_timestamp()")
    if mode == "worker_kill":
        os.killpg(cluster.workers[name].pid, signal.SIGKILL)
    else:
        os.kill(child, signal.SIGKILL)
    cluster.wait_for(
        "SELECT status = 'completed' FROM file_checkpoints WHERE file_url = %s",
        url,
        timeout=lease + 60,
        what=f"{url} to complete after {mode}",
    )
    seconds = float(
        cluster.scalar(
            "SELECT extract(epoch FROM completed_at - %s) FROM file_checkpoints"
            " WHERE file_url = %s",
            killed_at,
            url,
        )
    )
    history = [
        tuple(r)
        for r in cluster.conn.execute(
            "SELECT attempt, outcome FROM file_attempts WHERE file_url = %s ORDER BY token", (url,)
        ).fetchall()
    ]
    sink_rows = cluster.scalar("SELECT count(*) FROM sink WHERE file_url = %s", url)
    once = history == [(1, "lost"), (2, "completed")] and sink_rows == 1
    extra.setdefault(f"{mode}_exactly_once", []).append(once)
    extra.setdefault(f"{mode}_history", []).append(history)
    if mode == "worker_kill":
        cluster.workers[name].wait()
        del cluster.workers[name]
        cluster.wait_ready([cluster.start_worker()])  # back to two workers for the next round
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lease", type=float, default=5.0, help="PIPELINE_TEST_LEASE")
    parser.add_argument("--reap-interval", type=float, default=5.0, help="PIPELINE_REAP_INTERVAL")
    parser.add_argument("--sleep", type=float, default=5.0, help="first attempt's task time")
    args = parser.parse_args()
    from pipeline import app

    app.conf.broker_url = common.REDIS_URL
    extra: dict[str, Any] = {}
    common.flush_redis()
    with common.fresh_database() as db, tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(db, args.lease, args.reap_interval, pathlib.Path(tmp))
        try:
            cluster.wait_ready([cluster.start_worker(), cluster.start_worker()])
            cluster.start_beat()
            results = common.interleave(
                {
                    mode: (
                        lambda r, mode=mode: recovery(cluster, mode, args.sleep, args.lease, extra)
                    )
                    for mode in ("worker_kill", "child_kill")
                },
                args.rounds,
            )
        except BaseException:
            for name in [*cluster.workers, "beat"]:
                print(f"--- {name} log (tail) ---\n{cluster.log(name)[-3000:]}", file=sys.stderr)
            raise
        finally:
            cluster.close()
    common.flush_redis()

    worker_target = args.lease + 5.0
    rows = []
    for mode, target in (("worker_kill", worker_target), ("child_kill", CHILD_TARGET_S)):
        values = results[mode]
        rows.append(
            [
                "whole worker SIGKILLed (process group)"
                if mode == "worker_kill"
                else "one pool child SIGKILLed",
                f"{common.median(values):.2f} [{min(values):.2f}..{max(values):.2f}] s",
                f"<= {target:g} s: {common.verdict(common.median(values) <= target)}",
                "yes" if all(extra[f"{mode}_exactly_once"]) else "NO",
            ]
        )
    md = common.header(f"Recovery: SIGKILL mid-task to completed elsewhere, {args.rounds} rounds")
    md += (
        f"\nTwo prefork -c 2 workers, beat reaping every {args.reap_interval:g} s, lease "
        f"{args.lease:g} s, first attempt sleeping {args.sleep:g} s; kill time and completed_at "
        "both on the database clock.\n\n"
    )
    md += common.table(
        ["kill", "kill -> completed, median [min..max]", "target", "exactly once (attempts, sink)"],
        rows,
    )
    common.save("recovery", md, {"results": results, **vars(args), **extra})


if __name__ == "__main__":
    main()
