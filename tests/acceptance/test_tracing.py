"""A trace per file (the otel extra), on real workers: the producer's submit span, carried
through the Celery message to the worker's delivery, its claim, the function and the
completion; a retry carries the trace on; the tracer provider is made in each pool process
after the fork; the trace id is kept on the attempt row and `pipeline status --file` prints it.

Spans are kept by the SDK's in-memory exporter in each process and written out for the test
(tests/support/span_capture.py in the workers, tests/support/traced_submit.py for the producer).
"""

from __future__ import annotations

import collections
import json
import pathlib
import subprocess
import sys
from typing import Any

import pytest

from tests.support.flower_helpers import pipeline_executable
from tests.support.processes import REPO
from tests.support.workers import Cluster, wait_until

pytestmark = pytest.mark.slow

OK = "file:///traced/ok.csv"
RETRIED = "file:///traced/flaky.csv?raise_until=2"
DEAD = "file:///traced/poison.csv?permanent=1"
UNTRACED = "file:///traced/sent-without-a-trace.csv"


def read_spans(folder: pathlib.Path) -> list[dict[str, Any]]:
    spans = []
    for path in sorted(folder.glob("*.jsonl")):
        spans += [json.loads(line) for line in path.read_text().splitlines()]
    return spans


def test_trace_per_file__submit_to_completion_across_the_message_and_a_retry(
    cluster: Cluster, tmp_path: pathlib.Path
) -> None:
    span_dir = tmp_path / "spans"
    span_dir.mkdir()
    worker = cluster.start_worker(
        task_modules="tests.support.celery_tasks,tests.support.span_capture",
        extra_env={
            "PIPELINE_TRACING": "1",
            "OTEL_TRACES_EXPORTER": "none",
            "PIPELINE_TEST_SPAN_DIR": str(span_dir),
        },
    )
    produced = tmp_path / "producer.jsonl"
    env = cluster.env()
    submit = [sys.executable, "-m", "tests.support.traced_submit", str(produced), "tests.sink"]
    subprocess.run(
        [*submit, OK, RETRIED, DEAD],
        cwd=REPO,
        env=env,
        check=True,
        timeout=60,
    )
    cluster.send(UNTRACED)  # from this process: no tracer, no trace in the message
    cluster.wait_all_terminal(4, timeout=60)

    made = read_spans(tmp_path)  # the producer's (the workers' are in spans/)
    (batch,) = [s for s in made if s["name"] == "batch"]
    submits = {
        s["attributes"]["pipeline.file_url"]: s for s in made if s["name"] == "pipeline.submit"
    }
    assert set(submits) == {OK, RETRIED, DEAD}
    # A trace of its own per file, each linked to the batch span that was current.
    assert len({s["trace_id"] for s in submits.values()}) == 3
    for s in submits.values():
        assert (s["parent_id"], s["kind"], s["links"]) == (None, "PRODUCER", [batch["trace_id"]])

    # Each task's spans are written after it ends: wait for the last delivery's.
    wait_until(
        # ok, flaky twice, poison, the untraced one
        lambda: sum(s["name"] == "pipeline.task" for s in read_spans(span_dir)) >= 5,
        timeout=20,
        what="the deliveries' spans",
    )
    by_trace: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for span in read_spans(span_dir):
        by_trace[span["trace_id"]].append(span)

    # Made after the fork: in pool processes, each span under its own process's pid.
    pool = set(worker.child_pids())
    assert worker.pid not in pool
    assert {s["pid"] for spans in by_trace.values() for s in spans} <= pool, pool

    def tree(url: str) -> list[dict[str, Any]]:
        return by_trace[submits[url]["trace_id"]]

    # One delivery: task under the submit; claim, function, completion under the task.
    spans = tree(OK)
    (task,) = [s for s in spans if s["name"] == "pipeline.task"]
    assert (task["parent_id"], task["kind"]) == (submits[OK]["span_id"], "CONSUMER")
    assert task["attributes"]["pipeline.outcome"] == "completed"
    children = {s["name"]: s for s in spans if s["parent_id"] == task["span_id"]}
    assert set(children) == {"pipeline.claim", "pipeline.function", "pipeline.complete"}
    assert children["pipeline.claim"]["attributes"]["pipeline.claim"] == "granted"

    # A retry: the second delivery continues the first's trace, under the first delivery.
    spans = tree(RETRIED)
    first, second = sorted(
        (s for s in spans if s["name"] == "pipeline.task"),
        key=lambda s: s["attributes"]["celery.retries"],
    )
    assert first["parent_id"] == submits[RETRIED]["span_id"]
    assert second["parent_id"] == first["span_id"]
    assert first["attributes"]["pipeline.outcome"] == "retry"
    assert second["attributes"]["pipeline.outcome"] == "completed"
    assert {s["name"] for s in spans if s["parent_id"] == first["span_id"]} >= {"pipeline.fail"}
    (function_error,) = [
        s for s in spans if s["name"] == "pipeline.function" and s["status"] == "ERROR"
    ]
    assert function_error["parent_id"] == first["span_id"]

    # A dead file: the delivery ends in error, the failure recorded under it.
    (task,) = [s for s in tree(DEAD) if s["name"] == "pipeline.task"]
    assert (task["status"], task["attributes"]["pipeline.outcome"]) == ("ERROR", "FileDead")

    # Every attempt keeps its trace id; a message sent without one starts a trace there.
    rows = cluster.rows("SELECT file_url, attempt, trace_id FROM file_attempts ORDER BY token")
    kept = {(r.file_url, r.attempt): r.trace_id for r in rows}
    for url in (OK, RETRIED, DEAD):
        assert {k: v for k, v in kept.items() if k[0] == url}, url
        for (u, _), trace_id in kept.items():
            if u == url:
                assert trace_id == submits[url]["trace_id"], (url, kept)
    untraced = kept[(UNTRACED, 1)]
    assert untraced not in {s["trace_id"] for s in submits.values()}
    assert [s["parent_id"] for s in by_trace[untraced] if s["name"] == "pipeline.task"] == [None]

    # `pipeline status --file` prints it, for each attempt.
    shown = subprocess.run(
        [pipeline_executable(), "status", "--file", RETRIED, "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    attempts = json.loads(shown.stdout)["attempts"]
    assert [(a["attempt"], a["outcome"]) for a in attempts] == [(1, "failed"), (2, "completed")]
    assert {a["trace_id"] for a in attempts} == {submits[RETRIED]["trace_id"]}
    plain = subprocess.run(
        [pipeline_executable(), "status", "--file", RETRIED],
        cwd=REPO,
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submits[RETRIED]["trace_id"] in plain.stdout, plain.stdout
