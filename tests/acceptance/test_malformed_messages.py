"""Workers survive any message: a table of malformed bodies and headers against a real worker.

Each message is published raw (kombu, no Celery client), straight onto the test's queue; the
worker must reject each one, log its id and why, and go on to run a good task sent after them.
"""

from __future__ import annotations

import json
import pathlib
import uuid
from collections.abc import Iterator
from typing import Any

import kombu
import pytest

from tests.support.workers import Cluster, running_cluster, wait_until

pytestmark = pytest.mark.slow

JSON = "application/json"


def _headers(task: Any = "tests.sink", **extra: Any) -> dict[str, Any]:
    return {"lang": "py", "task": task, "id": f"bad-{uuid.uuid4().hex[:8]}", **extra}


# (case, body text, headers, content type, whether our guard logs "rejected message <id>")
CASES: list[tuple[str, bytes | str, dict[str, Any], str, bool]] = [
    ("body is a string", json.dumps("x"), _headers(), JSON, True),
    ("body has two items", json.dumps([[], {}]), _headers(), JSON, True),
    ("args is a string", json.dumps(["a", {}, {}]), _headers(), JSON, True),
    ("kwargs is a list", json.dumps([[], [], {}]), _headers(), JSON, True),
    ("embed is a string", json.dumps([[], {}, "x"]), _headers(), JSON, True),
    ("task name is a list", json.dumps([[], {}, {}]), _headers(task=["x"]), JSON, False),
    ("no id header", json.dumps([["file:///x"], {}, {}]), {"task": "tests.sink"}, JSON, False),
    (
        "id is a number",
        json.dumps([["file:///x"], {}, {}]),
        {"task": "tests.sink", "id": 5},
        JSON,
        False,
    ),
    ("eta is garbage", json.dumps([["file:///x"], {}, {}]), _headers(eta="x"), JSON, False),
    (
        "timelimit is a string",
        json.dumps([["file:///x"], {}, {}]),
        _headers(timelimit="x"),
        JSON,
        True,
    ),
    (
        "unknown task",
        json.dumps([["file:///x"], {}, {}]),
        _headers(task="no.such.task"),
        JSON,
        False,
    ),
    ("body is not JSON", "{{{", _headers(), JSON, False),
    ("pickle is refused", b"\x80\x04K\x01.", _headers(), "application/x-python-serialize", False),
    ("no headers, body a string", json.dumps("x"), {}, JSON, False),
    ("protocol 1 body without id", json.dumps({"task": "tests.sink"}), {}, JSON, False),
]


def _publish(
    cluster: Cluster, body: bytes | str, headers: dict[str, Any], content_type: str
) -> None:
    exchange = kombu.Exchange(cluster.queue, type="direct")
    with kombu.Connection(cluster.broker_url) as conn:
        conn.Producer().publish(
            body,
            exchange=exchange,
            routing_key=cluster.queue,
            headers=headers,
            content_type=content_type,
            content_encoding="binary" if isinstance(body, bytes) else "utf-8",
        )


@pytest.fixture
def broker_cluster(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, database_url: str, broker_url: str
) -> Iterator[Cluster]:
    """A cluster on each broker in turn (RabbitMQ: the test session's own vhost)."""
    with running_cluster(request, tmp_path, database_url, broker_url) as cluster:
        yield cluster


def test_malformed_messages__each_rejected_and_logged_worker_keeps_consuming(
    broker_cluster: Cluster,
) -> None:
    cluster = broker_cluster
    worker = cluster.start_worker(concurrency=1)
    for _, body, headers, content_type, _ in CASES:
        _publish(cluster, body, headers, content_type)
    good = "file:///after/the-bad-ones"
    cluster.send(good)
    cluster.wait_status(good, "completed", timeout=30)
    assert worker.alive(), worker.log()
    log = worker.log()
    assert "Unrecoverable error" not in log
    for case, _, headers, _, ours in CASES:
        if ours:
            assert f"rejected message {headers['id']}" in log, case
    # Nothing was put back: a worker started now has no poison message waiting for it.
    wait_until(lambda: cluster.queue_length() == 0, timeout=10, what="an empty queue")
    if cluster.redis is not None:
        assert not any(
            cluster.queue in raw.decode(errors="replace") for raw in cluster.redis.hvals("unacked")
        )
    second = cluster.start_worker(concurrency=1)
    cluster.send("file:///after/second-worker")
    cluster.wait_status("file:///after/second-worker", "completed", timeout=30)
    assert second.alive()
