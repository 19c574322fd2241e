"""S3 end to end (issue 11): the real CLI and a real worker on a private weed server.

The worker reaches the server through a fault proxy (tests/support/faultproxy.py), which can
answer 503, reset a connection or cut a body for the requests of one key; the CLI talks to the
server directly. Both get the endpoint and the keys from the environment, never the URL. The
worker bounds botocore's own retries (AWS_MAX_ATTEMPTS=2, as a user may) so that a storage
error escapes an attempt within a second here; the task's attempts and backoff do the rest.
"""

from __future__ import annotations

import gzip
import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline.sources import textfile
from tests.support import s3server
from tests.support.cli_helpers import Result, assert_no_traceback, cli_env, run_cli
from tests.support.faultproxy import FaultProxy
from tests.support.workers import Cluster

pytestmark = pytest.mark.slow

BUCKET = "pipeline-test"
WAIT = "60"


class World:
    """The module's worker, proxy, bucket and every CLI run (for the secret check)."""

    def __init__(self, cluster: Cluster, server: s3server.S3Server, proxy: FaultProxy) -> None:
        self.cluster = cluster
        self.server = server
        self.proxy = proxy
        self.fs = server.filesystem()
        self.results: list[Result] = []

    def env(self, **extra: str) -> dict[str, str]:
        return cli_env(self.cluster.env(task_modules=None, extra=self.server.env()), **extra)

    def cli(self, *args: str, **extra: str) -> Result:
        result = run_cli(*args, env=self.env(**extra))
        self.results.append(result)
        assert_no_traceback(result)
        return result

    def submit(self, pattern: str, batch: str, *more: str, **extra: str) -> Result:
        return self.cli("submit", "--glob", pattern, "--batch", batch, *more, **extra)

    def put(self, key: str, data: bytes) -> str:
        self.fs.pipe(f"{BUCKET}/{key}", data)
        return f"s3://{BUCKET}/{key}"

    def etag(self, key: str) -> str:
        return str(self.server.filesystem().info(f"{BUCKET}/{key}")["ETag"])

    def events(self, url: str) -> list[Any]:
        return self.cluster.rows(
            "SELECT line, event_id FROM events WHERE file_url = :u ORDER BY line", u=url
        )


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    database_url: str,
    redis_url: str,
    s3_server: s3server.S3Server,
) -> Iterator[World]:
    cluster = Cluster(
        tmp_path=tmp_path_factory.mktemp("s3"), database_url=database_url, broker_url=redis_url
    )
    cluster.reset_tables()
    proxy = FaultProxy(s3_server.endpoint).start()
    worker_env = {
        **s3_server.env(),
        "AWS_ENDPOINT_URL_S3": proxy.url,
        "FSSPEC_S3": json.dumps({"endpoint_url": proxy.url}),
        "AWS_RETRY_MODE": "standard",
        "AWS_MAX_ATTEMPTS": "2",
    }
    try:
        cluster.start_worker(concurrency=2, task_modules=None, extra_env=worker_env)
        here = World(cluster, s3_server, proxy)
        here.fs.mkdirs(BUCKET, exist_ok=True)
        yield here
    finally:
        cluster.close()
        proxy.close()


@pytest.fixture
def prefix(request: pytest.FixtureRequest, world: World) -> Iterator[str]:
    """A key prefix of this test's own; the worker's log is printed if the test failed."""
    yield f"t-{uuid.uuid4().hex[:8]}"
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        world.cluster.print_logs(tail=80)


def jsonl(n: int, tag: str) -> bytes:
    rows = (
        {"id": f"{tag}-{i}", "ts": "2026-01-01T00:00:00Z", "type": "t", "n": i} for i in range(n)
    )
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def summary(result: Result) -> str:
    found = re.search(r"batch \S+: .*? refused", result.flat_stderr)
    assert found, result.describe()
    return found.group()


# -- the happy path -----------------------------------------------------------------------


def test_submit_glob_wait__etag_fingerprints_every_record_once_big_objects_in_blocks(
    world: World, prefix: str
) -> None:
    # big: about 20 MB, two and a half read blocks: 5,000 records, each followed by a 4 KB
    # blank line (skipped by the reader), so the bytes are many and the rows to write few
    big_data = jsonl(5000, "big").replace(b"\n", b"\n" + b" " * 4000 + b"\n")
    assert len(big_data) > 2 * textfile.REMOTE_BLOCK_BYTES
    big = world.put(f"{prefix}/big.jsonl", big_data)
    lines = {
        world.put(f"{prefix}/a.jsonl", jsonl(30, "a")): list(range(1, 31)),
        world.put(f"{prefix}/sub/deeper/b.jsonl", jsonl(20, "b")): list(range(1, 21)),
        world.put(f"{prefix}/sub/c.jsonl.gz", gzip.compress(jsonl(25, "c"))): list(range(1, 26)),
        big: list(range(1, 10001, 2)),
    }
    world.put(f"{prefix}/sub/ignored.txt", b"not matched by the glob\n")

    result = world.submit(
        f"s3://{BUCKET}/{prefix}/**/*.jsonl*", "s3-happy", "--wait", "--timeout", WAIT
    )

    assert result.returncode == 0, result.describe()
    assert "4 files, 4 enqueued" in summary(result)
    for url, expected in lines.items():
        row = world.cluster.checkpoint(url)
        assert row is not None, url
        assert (row.status, row.attempt, row.records_persisted) == ("completed", 1, len(expected))
        assert row.fingerprint == world.etag(url.removeprefix(f"s3://{BUCKET}/"))
        events = world.events(url)
        assert [e.line for e in events] == expected
        assert len({e.event_id for e in events}) == len(expected)
    # The big object was read in ranged requests, none of them the whole object.
    gets = [r for r in world.proxy.requests_for(f"{prefix}/big.jsonl") if r.method == "GET"]
    assert len(gets) >= 2, gets
    assert max(r.body_bytes for r in gets) < len(big_data), gets
    assert sum(r.body_bytes for r in gets) >= len(big_data)


# -- generations ----------------------------------------------------------------------------


def test_resubmit__unchanged_enqueues_nothing_and_a_new_etag_is_a_new_generation(
    world: World, prefix: str
) -> None:
    key = f"{prefix}/changing.jsonl"
    url = world.put(key, jsonl(5, "v1"))
    world.put(f"{prefix}/steady.jsonl", jsonl(3, "s"))
    pattern = f"s3://{BUCKET}/{prefix}/*.jsonl"
    first = world.submit(pattern, "s3-gen", "--wait", "--timeout", WAIT)
    assert first.returncode == 0, first.describe()
    old = world.cluster.checkpoint(url)
    assert old is not None

    # steady.jsonl is resubmitted unchanged beside the changed one: it enqueues nothing.
    world.put(key, jsonl(7, "v2"))
    assert world.etag(key) != old.fingerprint
    changed = world.submit(pattern, "s3-gen", "--wait", "--timeout", WAIT)

    assert changed.returncode == 0, changed.describe()
    assert "2 files, 1 enqueued, 1 already completed" in summary(changed)
    new = world.cluster.checkpoint(url)
    assert new is not None
    assert new.status == "completed"
    assert new.generation == old.generation + 1
    assert new.fingerprint == world.etag(key)
    events = world.events(url)
    assert [e.event_id for e in events] == [f"v2-{i}" for i in range(7)]


# -- failures -------------------------------------------------------------------------------


def test_unreadable_objects__dead_after_their_attempts_with_the_error(
    world: World, prefix: str
) -> None:
    gone_key, down_key = f"{prefix}/gone.jsonl", f"{prefix}/down.jsonl"
    gone, down = world.put(gone_key, jsonl(4, "g")), world.put(down_key, jsonl(3, "d"))
    # gone: deleted just before the worker's first request for it (listed by submit, then
    # missing); down: the storage answers 503 to every request for it, for ever.
    world.proxy.before(gone_key, lambda: world.server.filesystem().rm(f"{BUCKET}/{gone_key}"))
    fault = world.proxy.arm(down_key, "503", times=-1)
    started = time.monotonic()
    try:
        result = world.submit(f"s3://{BUCKET}/{prefix}/*", "s3-dead", "--wait", "--timeout", WAIT)
    finally:
        world.proxy.disarm(fault)
    elapsed = time.monotonic() - started

    assert result.returncode == 1, result.describe()
    for url in (gone, down):
        row = world.cluster.checkpoint(url)
        assert row is not None
        assert (row.status, row.attempt) == ("dead", 3), row
        assert world.events(url) == []
    assert f"No such object: '{gone}'" in world.cluster.checkpoint(gone).error_message
    assert "Service Unavailable" in world.cluster.checkpoint(down).error_message
    # The library retries are bounded: three attempts and two backoffs (at most 2 s and 4 s).
    assert elapsed < 30, elapsed
    status = world.cli("status", "--batch", "s3-dead")
    assert "No such object" in status.stdout, status.describe()
    assert gone in status.stdout, status.describe()


def test_transient_storage_errors__retried_and_each_file_completes_once(
    world: World, prefix: str
) -> None:
    faults = {}
    for kind, times, methods in (("503", 3, None), ("reset", 3, None), ("cut", 2, ("GET",))):
        key = f"{prefix}/{kind}.jsonl"
        world.put(key, jsonl(40, kind))
        faults[f"s3://{BUCKET}/{key}"] = world.proxy.arm(key, kind, times=times, methods=methods)

    result = world.submit(f"s3://{BUCKET}/{prefix}/*", "s3-flaky", "--wait", "--timeout", WAIT)

    assert result.returncode == 0, result.describe()
    for url, fault in faults.items():
        assert (fault.fired, fault.remaining) == (fault.armed, 0), (url, fault)
        row = world.cluster.checkpoint(url)
        assert row is not None
        assert row.status == "completed", row
        assert row.records_persisted == 40
        assert [e.line for e in world.events(url)] == list(range(1, 41))
    # More 503s than botocore's two tries: the first attempt failed, the task retried it.
    row = world.cluster.checkpoint(f"s3://{BUCKET}/{prefix}/503.jsonl")
    assert row is not None
    assert row.attempt >= 2, row
    assert min(world.cluster.attempts(row.file_url), key=lambda a: a.attempt).outcome == "failed"


# -- secrets --------------------------------------------------------------------------------


def test_secret__in_no_output_log_row_or_message(world: World, prefix: str) -> None:
    secret = s3server.SECRET_KEY
    url = world.put(f"{prefix}/s.jsonl", jsonl(2, "s"))
    idle = f"{world.cluster.queue}-idle"
    queued = world.submit(f"s3://{BUCKET}/{prefix}/*.jsonl", "s3-secret", PIPELINE_QUEUE=idle)
    assert "1 enqueued" in summary(queued)
    world.cli("status", "--json")  # every batch of the module, the dead files' errors included
    assert world.cluster.redis is not None
    messages = [m.decode() for m in world.cluster.redis.lrange(idle, 0, -1)]
    assert len(messages) == 1
    assert url in messages[0]  # the task's args, as Flower shows them

    tables = {
        table: world.cluster.scalar(f"SELECT coalesce(string_agg(t::text, ' '), '') FROM {table} t")
        for table in ("file_checkpoints", "file_attempts", "events")
    }
    assert world.results
    for result in world.results:
        assert secret not in result.output, result.describe()
    for proc in world.cluster.procs:
        assert secret not in proc.log(), proc.name
    for table, text in tables.items():
        assert secret not in text, table
    assert secret not in messages[0]
