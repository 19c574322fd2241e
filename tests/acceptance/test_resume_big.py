"""A 2,000,000-line file through the reference task on a real worker, its pool process
SIGKILLed at about 50 % and again at about 90 %: each next attempt starts at the last committed
position (not at line 1), and every line is in `events` once. Locally and on S3; and an S3
object overwritten between two attempts starts over as a new generation.
"""

from __future__ import annotations

import json
import pathlib
import signal
from typing import Any

import pytest

from pipeline.reference.task import ingest_file
from tests.support import s3server
from tests.support.workers import Cluster, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

LINES = 2_000_000
BUCKET = "resume-test"


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    row = '{"id":"e%d","ts":"2024-03-01T10:00:00Z","type":"view"}\n'
    with path.open("w") as out:
        for start in range(1, LINES + 1, 100_000):
            out.write("".join(row % n for n in range(start, start + 100_000)))
    return path


def progress(cluster: Cluster, file_url: str) -> int:
    row = cluster.checkpoint(file_url)
    return int(row.position["line"]) if row is not None and row.position else 0


def kill_at(cluster: Cluster, worker: Any, file_url: str, line: int, attempt: int) -> None:
    """SIGKILL the pool process running `attempt` once it has committed `line` lines."""
    wait_until(
        lambda: progress(cluster, file_url) >= line,
        timeout=240,
        what=f"{file_url} past line {line} (attempt {attempt})",
        interval=0.05,
    )
    row = cluster.checkpoint(file_url)
    assert row is not None
    assert row.attempt == attempt, row
    _, pid = cluster.worker_of(row.processed_by)
    worker.signal_child(pid, signal.SIGKILL)


def check_resumed_twice(cluster: Cluster, file_url: str) -> None:
    done = cluster.wait_status(file_url, "completed", timeout=240)
    assert (done.records_persisted, done.attempts_spent) == (LINES, 0)
    counts = cluster.rows(
        "SELECT count(*) AS n, count(DISTINCT line) AS lines, min(line) AS first,"
        " max(line) AS last FROM events WHERE file_url = :u",
        u=file_url,
    )[0]
    assert (counts.n, counts.lines, counts.first, counts.last) == (LINES, LINES, 1, LINES)
    first, second, third = cluster.attempts(file_url)
    assert [a.outcome for a in (first, second, third)] == ["lost", "lost", "completed"]
    # Each next attempt started at the last committed position, not at line 1.
    assert second.start_position == first.end_position
    assert third.start_position == second.end_position
    assert second.start_position["line"] >= LINES // 2 - 100_000
    assert third.start_position["line"] >= LINES * 9 // 10 - 100_000


def test_local__sigkilled_at_half_and_at_ninety_percent__resumes_and_every_line_lands_once(
    cluster: Cluster, big_file: pathlib.Path
) -> None:
    file_url = big_file.as_uri()
    worker = cluster.start_worker(concurrency=1, task_modules=None)
    cluster.send(file_url, task=ingest_file)
    kill_at(cluster, worker, file_url, LINES // 2, attempt=1)
    kill_at(cluster, worker, file_url, LINES * 9 // 10, attempt=2)
    check_resumed_twice(cluster, file_url)


@pytest.fixture
def s3_cluster(
    cluster: Cluster, s3_server: s3server.S3Server
) -> tuple[Cluster, Any, dict[str, str]]:
    fs = s3_server.filesystem()
    fs.mkdirs(BUCKET, exist_ok=True)
    return cluster, fs, s3_server.env()


def test_s3__sigkilled_at_half_and_at_ninety_percent__resumes_and_every_line_lands_once(
    s3_cluster: tuple[Cluster, Any, dict[str, str]], big_file: pathlib.Path
) -> None:
    cluster, fs, env = s3_cluster
    fs.put_file(str(big_file), f"{BUCKET}/big.jsonl")
    file_url = f"s3://{BUCKET}/big.jsonl"
    worker = cluster.start_worker(concurrency=1, task_modules=None, extra_env=env)
    cluster.send(file_url, task=ingest_file)
    kill_at(cluster, worker, file_url, LINES // 2, attempt=1)
    kill_at(cluster, worker, file_url, LINES * 9 // 10, attempt=2)
    check_resumed_twice(cluster, file_url)


def test_s3__object_overwritten_between_attempts__a_new_generation_from_the_beginning(
    s3_cluster: tuple[Cluster, Any, dict[str, str]],
) -> None:
    cluster, fs, env = s3_cluster
    key = f"{BUCKET}/changing.jsonl"

    def body(tag: str, count: int) -> bytes:
        rows = (
            {"id": f"{tag}{n}", "ts": "2024-03-01T10:00:00Z", "type": tag} for n in range(count)
        )
        return "".join(json.dumps(r) + "\n" for r in rows).encode()

    fs.pipe(key, body("old", 300_000))
    file_url = f"s3://{key}"
    worker = cluster.start_worker(concurrency=1, task_modules=None, extra_env=env)
    cluster.send(file_url, task=ingest_file)
    wait_until(
        lambda: progress(cluster, file_url) >= 50_000,
        timeout=120,
        what="a first chunk",
        interval=0.05,
    )
    row = cluster.checkpoint(file_url)
    assert row is not None
    _, pid = cluster.worker_of(row.processed_by)
    worker.signal_child(pid, signal.SIGKILL)
    fs.pipe(key, body("new", 1_000))  # overwritten before the next attempt reads it
    done = cluster.wait_status(file_url, "completed", timeout=120)
    assert (done.generation, done.records_persisted) == (2, 1_000)
    kinds = cluster.rows(
        "SELECT type, count(*) AS n FROM events WHERE file_url = :u GROUP BY type", u=file_url
    )
    assert [(k.type, k.n) for k in kinds] == [("new", 1_000)]
