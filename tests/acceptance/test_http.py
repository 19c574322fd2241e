"""HTTP end to end (issue 11): the real CLI and a real worker reading from a
standard-library HTTP server in this process (tests/support/httpfiles.py).

URLs given to submit are fingerprinted with a HEAD (ETag, else length and Last-Modified):
HTTP has no listing to carry them.
"""

from __future__ import annotations

import email.utils
import gzip
import json
import pathlib
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline.sources import textfile
from tests.support.cli_helpers import Result, assert_no_traceback, cli_env, run_cli
from tests.support.httpfiles import FileServer
from tests.support.workers import Cluster

pytestmark = pytest.mark.slow

WAIT = "60"
DATE = "Tue, 01 Dec 2026 10:00:00 GMT"


class World:
    def __init__(self, cluster: Cluster, server: FileServer) -> None:
        self.cluster = cluster
        self.server = server

    def cli(self, *args: str) -> Result:
        result = run_cli(*args, env=cli_env(self.cluster.env(task_modules=None)))
        assert_no_traceback(result)
        return result

    def events(self, url: str) -> list[Any]:
        return self.cluster.rows(
            "SELECT line, event_id FROM events WHERE file_url = :u ORDER BY line", u=url
        )


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str
) -> Iterator[World]:
    cluster = Cluster(
        tmp_path=tmp_path_factory.mktemp("http"), database_url=database_url, broker_url=redis_url
    )
    cluster.reset_tables()
    server = FileServer().start()
    try:
        cluster.start_worker(concurrency=2, task_modules=None)
        yield World(cluster, server)
    finally:
        cluster.close()
        server.close()


@pytest.fixture
def prefix(request: pytest.FixtureRequest, world: World) -> Iterator[str]:
    yield f"/t-{uuid.uuid4().hex[:8]}"
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        world.cluster.print_logs(tail=80)


def jsonl(n: int, tag: str, *, blank: int = 0) -> bytes:
    """n records; with `blank`, each followed by a blank line that long (skipped when read)."""
    end = "\n" + " " * blank + "\n" if blank else "\n"
    rows = ({"id": f"{tag}-{i}", "ts": "2026-01-01T00:00:00Z", "type": "t"} for i in range(n))
    return "".join(json.dumps(r) + end for r in rows).encode()


def summary(result: Result) -> str:
    found = re.search(r"batch \S+: .*? refused", result.flat_stderr)
    assert found, result.describe()
    return found.group()


def test_submit_urls_wait__fingerprints_from_etag_or_last_modified_and_records_once(
    world: World, prefix: str
) -> None:
    tagged = world.server.put(f"{prefix}/a.jsonl", jsonl(12, "a"), etag='"a-v1"')
    dated_body = jsonl(8, "b")
    dated = world.server.put(f"{prefix}/b.jsonl", dated_body, last_modified=DATE)
    zipped = world.server.put(f"{prefix}/c.jsonl.gz", gzip.compress(jsonl(5, "c")), etag='W/"c"')
    # Larger than a read block, on a server that ignores Range (as `python -m http.server`)
    big_body = jsonl(2500, "d", blank=4000)
    assert len(big_body) > textfile.REMOTE_BLOCK_BYTES
    big = world.server.put(f"{prefix}/d.jsonl", big_body, etag='"d"', ranges=False)

    result = world.cli("submit", tagged, dated, zipped, big, "--batch", "http-ok", "--wait")

    assert result.returncode == 0, result.describe()
    assert "4 files, 4 enqueued" in summary(result)
    stamp = int(email.utils.parsedate_to_datetime(DATE).timestamp())
    expected = {
        tagged: ('"a-v1"', 12),
        dated: (f"{len(dated_body)}:{stamp}", 8),
        zipped: ('W/"c"', 5),
    }
    for url, (fingerprint, n) in expected.items():
        row = world.cluster.checkpoint(url)
        assert row is not None, url
        assert (row.status, row.attempt, row.fingerprint) == ("completed", 1, fingerprint), row
        assert [e.line for e in world.events(url)] == list(range(1, n + 1))
    row = world.cluster.checkpoint(big)
    assert row is not None
    assert (row.status, row.attempt, row.records_persisted) == ("completed", 1, 2500), row


def test_resubmit__unchanged_enqueues_nothing_and_a_changed_etag_is_a_new_generation(
    world: World, prefix: str, tmp_path: pathlib.Path
) -> None:
    path = f"{prefix}/changing.jsonl"
    url = world.server.put(path, jsonl(4, "v1"), etag='"1"')
    steady = world.server.put(f"{prefix}/steady.jsonl", jsonl(2, "s"), last_modified=DATE)
    listing = tmp_path / "urls.txt"
    listing.write_text(f"{url}\n{steady}\n")
    first = world.cli("submit", "--from", str(listing), "--batch", "http-gen", "--wait")
    assert first.returncode == 0, first.describe()

    # steady.jsonl is resubmitted unchanged beside the changed one: it enqueues nothing.
    world.server.put(path, jsonl(6, "v2"), etag='"2"')
    changed = world.cli("submit", "--from", str(listing), "--batch", "http-gen", "--wait")

    assert changed.returncode == 0, changed.describe()
    assert "2 files, 1 enqueued, 1 already completed" in summary(changed)
    row = world.cluster.checkpoint(url)
    assert row is not None
    assert (row.status, row.generation, row.fingerprint) == ("completed", 2, '"2"'), row
    assert [e.event_id for e in world.events(url)] == [f"v2-{i}" for i in range(6)]


def test_faulty_server__404_dead_503_and_cut_bodies_retried_never_leaving_partial_events(
    world: World, prefix: str
) -> None:
    # The cut files are 10 MB and stop halfway: the first attempt has streamed about 1,250
    # records into its transaction when the body ends short, and none of them may stay.
    big = jsonl(2500, "x", blank=4000)
    files = {
        "503": (jsonl(30, "u"), False, 30),
        "short": (big, False, 2500),
        "cut": (big, True, 2500),
    }
    urls, faults = {}, {}
    for kind, (body, chunked, _n) in files.items():
        path = f"{prefix}/{kind}.jsonl"
        urls[kind] = world.server.put(path, body, etag=f'"{kind}"', chunked=chunked)
        faults[kind] = world.server.arm(path, kind)

    missing = f"{world.server.base}{prefix}/missing.jsonl"

    result = world.cli(
        "submit", *urls.values(), missing, "--batch", "http-flaky", "--wait", "--timeout", WAIT
    )

    assert result.returncode == 1, result.describe()  # the 404 ended dead
    row = world.cluster.checkpoint(missing)
    assert row is not None
    assert (row.status, row.attempt) == ("dead", 3), row
    assert "No such object" in row.error_message, row
    assert "404" in row.error_message, row
    assert missing in row.error_message, row
    for kind, url in urls.items():
        n = files[kind][2]
        assert faults[kind].fired == 1, kind
        row = world.cluster.checkpoint(url)
        assert row is not None
        assert (row.status, row.attempt, row.records_persisted) == ("completed", 2, n), row
        first = min(world.cluster.attempts(url), key=lambda a: a.attempt)
        assert first.outcome == "failed", first
        lines = [e.line for e in world.events(url)]
        step = 2 if kind != "503" else 1
        assert lines == list(range(1, n * step + 1, step)), kind
