"""`@checkpointed` tasks run in this process: eagerly (`apply()`) and by an embedded worker.

Real Postgres (the session's database) and real Redis (the suite's db); the worker is
`celery.contrib.testing.worker.start_worker` on `pipeline.app`, solo pool, so its tasks use
the store set in this process and its signals fire here, where the test can read results.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery.contrib.testing.worker import start_worker
from celery.signals import task_retry, task_success

from pipeline import errors
from pipeline.store.postgres import PostgresStore
from pipeline.worker import runtime
from tests.support.celery_tasks import SINK_DDL, plain, sink
from tests.support.processes import free_port
from tests.support.workers import app_on, drop_queue_keys, wait_until


@pytest.fixture
def store(pg_store: PostgresStore) -> Iterator[PostgresStore]:
    """The session database's store, used by tasks run in this process; sink emptied."""
    pg_store.execute_script(f"{SINK_DDL}; TRUNCATE sink")
    saved = runtime._store
    runtime.set_store(pg_store)
    yield pg_store
    runtime.set_store(saved)


def _sink_rows(store: PostgresStore, url: str) -> int:
    return int(store.scalar("SELECT count(*) FROM sink WHERE file_url = :u", {"u": url}))


# -- eager: apply() runs the task here and returns what the worker would report ---------------


def test_eager_apply__completed_file_returns_its_stats(store: PostgresStore) -> None:
    url = "file:///eager/ok"
    result = sink.apply(args=[url])
    assert result.state == "SUCCESS"
    assert result.get() == {
        "file_url": url,
        "attempt": 1,
        "total": 1,
        "filtered": 0,
        "persisted": 1,
    }
    checkpoint = store.get(url)
    assert checkpoint is not None
    assert checkpoint.status == "completed"
    assert _sink_rows(store, url) == 1


def test_eager_apply__duplicate_is_a_success_that_says_skipped(store: PostgresStore) -> None:
    url = "file:///eager/dup"
    sink.apply(args=[url]).get()
    duplicate = sink.apply(args=[url])
    assert duplicate.state == "SUCCESS"
    assert duplicate.get() == {
        "file_url": url,
        "skipped": True,
        "reason": "already completed",
        "stats": {"total": 1, "filtered": 0, "persisted": 1},
    }
    assert _sink_rows(store, url) == 1
    assert len(store.get(url, with_attempts=True).attempts) == 1  # type: ignore[union-attr]


def test_eager_apply__task_without_checkpoint_parameter_completes(store: PostgresStore) -> None:
    url = "file:///eager/plain"
    assert plain.apply(args=[url]).get() == {
        "file_url": url,
        "attempt": 1,
        "total": 2,
        "filtered": 1,
        "persisted": 1,
    }
    assert store.get(url).stats.as_dict() == {"total": 2, "filtered": 1, "persisted": 1}  # type: ignore[union-attr]


def test_eager_apply__dead_file_raises_file_dead(store: PostgresStore) -> None:
    url = "file:///eager/perm?permanent=1"
    with pytest.raises(errors.FileDead, match="dead after attempt 1 of 3"):
        sink.apply(args=[url], throw=True)
    # Once dead, every later execution is refused without running.
    again = sink.apply(args=[url])
    assert again.state == "FAILURE"
    assert isinstance(again.result, errors.FileDead)
    assert "is dead" in str(again.result)
    assert len(store.get(url, with_attempts=True).attempts) == 1  # type: ignore[union-attr]


def test_eager_apply__retryable_failures_run_to_the_attempt_cap(store: PostgresStore) -> None:
    # Celery re-runs an eager retry at once: the three attempts happen inside apply().
    url = "file:///eager/raise?raise=1"
    result = sink.apply(args=[url])
    assert result.state == "FAILURE"
    assert isinstance(result.result, errors.FileDead)
    assert "dead after attempt 3 of 3: Boom: boom on attempt 3" in str(result.result)
    checkpoint = store.get(url, with_attempts=True)
    assert checkpoint is not None
    assert [(a.attempt, a.outcome) for a in checkpoint.attempts] == [
        (1, "failed"),
        (2, "failed"),
        (3, "failed"),
    ]


def test_eager_apply__busy_file_is_skipped_at_once_with_the_time_left(
    store: PostgresStore,
) -> None:
    url = "file:///eager/busy"
    holder = store.claim(url, "someone-else", 30)
    assert holder
    result = sink.apply(args=[url])
    # Postgres decides: the holder finishes, or the sweep hands the file on when its lease
    # ends; this delivery is only a copy and ends at once, scheduling nothing.
    assert result.state == "SUCCESS"
    assert result.result["skipped"] is True
    assert result.result["reason"] == "in progress elsewhere"
    assert 29 < result.result["lease_ends_in"] <= 30
    assert _sink_rows(store, url) == 0
    assert len(store.get(url, with_attempts=True).attempts) == 1  # type: ignore[union-attr]


def test_eager_apply__database_unreachable_returns_retry(store: PostgresStore) -> None:
    # Nothing listens there: the claim cannot be made, so the task must not run.
    unreachable = PostgresStore(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none")
    runtime.set_store(unreachable)
    try:
        result = sink.apply(args=["file:///eager/nodb"])
    finally:
        runtime.set_store(store)
        unreachable.close()
    assert result.state == "RETRY"
    assert isinstance(result.result.exc, errors.StoreUnavailable)
    assert store.get("file:///eager/nodb") is None


# -- an embedded worker on the test Redis -------------------------------------------------------


class Outcomes:
    """Results and retries of the embedded worker's tasks, from Celery's signals."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.succeeded: list[tuple[str, Any]] = []
        self.retried: list[tuple[str, str]] = []

    def on_success(self, sender: Any = None, result: Any = None, **_: Any) -> None:
        with self.lock:
            self.succeeded.append((sender.request.id, result))

    def on_retry(self, request: Any = None, reason: Any = None, **_: Any) -> None:
        with self.lock:
            self.retried.append((request.id, str(reason)))

    def result_of(self, task_id: str) -> Any:
        with self.lock:
            return next((r for i, r in self.succeeded if i == task_id), None)


@pytest.fixture
def worker(
    store: PostgresStore, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Outcomes, str]]:
    """An in-process solo worker on a queue of its own; yields (outcomes, queue).

    Without its sweep thread: in the test process it would sweep the database the store tests
    share, racing their own `reap` calls (the acceptance tests' workers sweep their own).
    """
    monkeypatch.setenv("PIPELINE_SWEEP", "0")
    queue = f"inproc-{uuid.uuid4().hex[:10]}"
    outcomes = Outcomes()
    task_success.connect(outcomes.on_success, weak=False)
    task_retry.connect(outcomes.on_retry, weak=False)
    try:
        with (
            app_on(redis_url, queue) as app,
            start_worker(
                app,
                pool="solo",
                concurrency=1,
                perform_ping_check=False,
                queues=[queue],
                shutdown_timeout=10,
            ),
        ):
            yield outcomes, queue
    finally:
        task_success.disconnect(outcomes.on_success)
        task_retry.disconnect(outcomes.on_retry)
        client = redis.Redis.from_url(redis_url)
        drop_queue_keys(client, queue)
        client.close()


def test_worker__duplicate_message_succeeds_with_skipped_result(
    store: PostgresStore, worker: tuple[Outcomes, str]
) -> None:
    outcomes, queue = worker
    url = "file:///inproc/dup"
    first = sink.apply_async(args=[url], queue=queue)
    second = sink.apply_async(args=[url], queue=queue)

    done = wait_until(lambda: outcomes.result_of(first.id), timeout=20, what="the first task")
    dup = wait_until(lambda: outcomes.result_of(second.id), timeout=20, what="the duplicate")
    assert done == {"file_url": url, "attempt": 1, "total": 1, "filtered": 0, "persisted": 1}
    assert dup["skipped"] is True
    assert dup["reason"] == "already completed"
    assert _sink_rows(store, url) == 1
    assert len(store.get(url, with_attempts=True).attempts) == 1  # type: ignore[union-attr]


def test_worker__busy_file_is_skipped_without_a_retry_and_the_holder_finishes(
    store: PostgresStore, worker: tuple[Outcomes, str]
) -> None:
    outcomes, queue = worker
    url = "file:///inproc/busy"
    holder = store.claim(url, "someone-else", 30.0)
    assert holder
    sent = sink.apply_async(args=[url], queue=queue)

    result = wait_until(lambda: outcomes.result_of(sent.id), timeout=20, what="the busy copy")
    assert result["skipped"] is True
    assert result["reason"] == "in progress elsewhere"
    assert outcomes.retried == [], "a copy of a busy file must not schedule another message"
    store.complete(url, holder.token, {"total": 5, "filtered": 0, "persisted": 5})
    assert _sink_rows(store, url) == 0
    row = store.get(url)
    assert row is not None
    assert row.status.value == "completed"


def test_worker__pickled_message_is_refused(
    store: PostgresStore,
    worker: tuple[Outcomes, str],
    redis_url: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # accept_content is JSON only: a pickle could run code in the worker as it is decoded.
    outcomes, queue = worker
    url = "file:///inproc/pickled"
    try:
        sink.apply_async(args=[url], queue=queue, serializer="pickle")
        refused_at_publish = False
    except Exception as error:  # refused at publish: as good as refused by the worker
        print(f"pickle refused at publish: {error!r}")
        refused_at_publish = True
    # A JSON message behind it on the same queue: once it is done, the solo worker has read
    # (and refused) the pickled one before it.
    sentinel = sink.apply_async(args=["file:///inproc/sentinel"], queue=queue)
    wait_until(lambda: outcomes.result_of(sentinel.id), timeout=20, what="the sentinel")

    assert store.get(url) is None, "the pickled message must never claim its file"
    assert _sink_rows(store, url) == 0
    if not refused_at_publish:
        err = capfd.readouterr().err
        assert "Refusing to deserialize untrusted content of type pickle" in err
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.llen(queue) == 0, "the refused message is dropped, not left queued"
    finally:
        client.close()
