"""Hostile files on real `celery worker` subprocesses: data errors and files that are not files."""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import time

import psutil
import pytest

from pipeline.reference.task import ingest_file
from tests.support.workers import Cluster

pytestmark = pytest.mark.slow


def test_ingest_line_with_a_3kb_type__filtered_and_the_rest_kept(
    cluster: Cluster, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "big-type.jsonl"
    rows = [
        {"id": "e1", "ts": "2024-03-01T10:00:00Z", "type": "view"},
        {"id": "e2", "ts": "2024-03-01T10:00:01Z", "type": secrets.token_hex(1500)},
        {"id": "e3", "ts": "2024-03-01T10:00:02Z", "type": "click"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    url = path.as_uri()
    cluster.start_worker(task_modules=None)
    started = time.monotonic()
    cluster.send(url, task=ingest_file)
    row = cluster.wait_status(url, "completed", timeout=30)
    assert time.monotonic() - started < 20
    assert (row.records_total, row.records_filtered, row.records_persisted) == (3, 1, 2)
    assert "line 2: type longer than 1000 bytes" in json.dumps(row.details)
    assert cluster.scalar("SELECT count(*) FROM events WHERE file_url = :u", u=url) == 2


def test_output_the_database_refuses__dead_at_once_with_the_databases_message(
    cluster: Cluster,
) -> None:
    url = "file:///refused/by-db?dataerror=1"
    cluster.start_worker()
    cluster.send(url)
    row = cluster.wait_status(url, "dead", timeout=20)
    # A data error is the file's, not an outage: one attempt, the database's own words.
    assert row.attempt == 1
    assert "division by zero" in row.error_message
    assert "unreachable" not in row.error_message
    assert "worker lost" not in row.error_message
    assert cluster.scalar("SELECT count(*) FROM sink WHERE file_url = :u", u=url) == 0


def _pool_fds(cluster: Cluster) -> int:
    return sum(
        p.num_fds()
        for proc in cluster.procs
        for p in proc.children()
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    )


def test_ingest_of_a_fifo_a_directory_and_dev_zero__dead_at_once_no_blocked_pool_no_fd_leak(
    cluster: Cluster, tmp_path: pathlib.Path
) -> None:
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    zero = tmp_path / "zero.jsonl"  # the extension passes; what it names is a device
    zero.symlink_to("/dev/zero")
    good = tmp_path / "good.jsonl"
    good.write_text('{"id": "1", "ts": "2024-01-01T00:00:00Z", "type": "t"}\n')
    worker = cluster.start_worker(task_modules=None, concurrency=1)
    # Warm up first: the pool process opens its database connections on its first file.
    cluster.send(good.as_uri(), task=ingest_file)
    cluster.wait_status(good.as_uri(), "completed", timeout=20)
    fds_before = _pool_fds(cluster)
    urls = [fifo.as_uri(), folder.as_uri(), zero.as_uri()]
    for url in urls:
        cluster.send(url, task=ingest_file)
    for url in urls:
        row = cluster.wait_status(url, "dead", timeout=20)
        assert row.attempt == 1, row.error_message
        assert "not a regular file" in row.error_message
    # The one pool process is free: a good file after them completes.
    after = tmp_path / "after.jsonl"
    after.write_bytes(good.read_bytes())
    cluster.send(after.as_uri(), task=ingest_file)
    cluster.wait_status(after.as_uri(), "completed", timeout=20)
    assert worker.alive()
    assert _pool_fds(cluster) <= fds_before
    targets = {str(fifo), str(folder), "/dev/zero"}
    for child in worker.children():
        links = {
            os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{child.pid}/fd")
        }
        assert not links & targets, links & targets
