"""A batch's counters (pipeline_batch_counts, migration 0016) against its files: after every
kind of move a file makes (registration, claim, complete, fail, dead, abandon, a crashed claim
reaped or taken over, cancel, a cancelled chunk, a claim refused for good, requeue, a new
generation, prune), the sum over the batch's slots equals a GROUP BY over file_checkpoints,
and `status --batch` reads them."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import sqlalchemy as sa

from pipeline.models import BatchSpec, Claim, Stats, Status
from pipeline.store import postgres
from pipeline.store.postgres import PostgresStore
from tests.support.rows import backdate_retry, expire_lease

LEASE = 600.0

# Each batch's files by status, and the record totals of its completed ones: from the files,
# and from the counters.
FROM_FILES = """
SELECT coalesce(jsonb_object_agg(b.batch_id, b.figures), '{}'::jsonb) FROM (
    SELECT s.batch_id, jsonb_object_agg(s.status, s.n) || jsonb_build_object(
               'records', (SELECT coalesce(sum(c.records_total), 0) FROM file_checkpoints c
                            WHERE c.batch_id = s.batch_id AND c.status = 'completed')) AS figures
      FROM (SELECT batch_id, status, count(*) AS n FROM file_checkpoints
             WHERE batch_id IS NOT NULL GROUP BY batch_id, status) s
     GROUP BY s.batch_id) b
"""
FROM_COUNTERS = """
SELECT coalesce(jsonb_object_agg(t.batch, t.figures), '{}'::jsonb) FROM (
    SELECT f.batch, (SELECT jsonb_object_agg(v.status, v.n) FROM (VALUES
               ('pending', f.pending), ('processing', f.processing),
               ('completed', f.completed), ('failed', f.failed),
               ('dead', f.dead), ('cancelled', f.cancelled)) v (status, n)
             WHERE v.n <> 0)
           || jsonb_build_object('records', f.records_total) AS figures
      FROM pipeline_batch_figures f) t
 WHERE t.figures <> '{"records": 0}'::jsonb
"""


def exact(store: PostgresStore) -> dict[str, Any]:
    """The counters equal the files' GROUP BY, and every read of a batch says the same."""
    files = store.scalar(FROM_FILES)
    assert store.scalar(FROM_COUNTERS) == files
    for name, figures in files.items():
        counts = {Status(s): n for s, n in figures.items() if s != "records"}
        assert store.summary(name) == {name: counts}
        batch = store.batch(name)
        if batch is not None:
            assert batch.counts == counts
            overview = store.overview(name)
            assert overview.records is not None
            assert overview.records.total == figures["records"]
    return dict(files)


def claim(store: PostgresStore, url: str, **kw: Any) -> Claim:
    c = store.claim(url, "w:1", LEASE, token=store.reserve_token(), **kw)
    assert isinstance(c, Claim), c
    return c


def urls(batch: str, n: int) -> list[str]:
    return [f"file:///data/{batch}/{i:03}.jsonl" for i in range(n)]


def test_counts__every_transition_keeps_the_counters_equal_to_the_files(
    pg_store: PostgresStore,
) -> None:
    pg_store.open_batch(BatchSpec("a", "t", "me"))
    pg_store.open_batch(BatchSpec("b", "t", "me"))
    a = urls("a", 12)
    b = urls("b", 6)
    pg_store.register([(u, "v1") for u in a], batch_id="a", task_name="t")
    pg_store.register(b, batch_id="b", task_name="t")
    pg_store.register(["file:///no-batch"], task_name="t")
    assert exact(pg_store)["a"] == {"pending": 12, "records": 0}

    # claim, complete (with records), fail with a retry, fail for good (dead)
    c0 = claim(pg_store, a[0])
    exact(pg_store)
    pg_store.complete(a[0], c0.token, Stats(10, 2, 8))
    c1 = claim(pg_store, a[1])
    pg_store.fail(a[1], c1.token, "boom", retry_in=0.0)
    exact(pg_store)
    c1 = claim(pg_store, a[1])  # again, from failed
    pg_store.fail(a[1], c1.token, "bad input", retryable=False)
    assert exact(pg_store)["a"] == {"pending": 10, "completed": 1, "dead": 1, "records": 10}

    # the last attempt spent: the claim finds the file dead
    c2 = claim(pg_store, a[2], max_attempts=1)
    pg_store.fail(a[2], c2.token, "boom", retry_in=0.0)
    backdate_retry(pg_store, a[2], 1.0)
    assert not isinstance(pg_store.claim(a[2], "w:1", LEASE, max_attempts=1), Claim)
    exact(pg_store)

    # abandon (a worker's shutdown hands the file back)
    claim(pg_store, a[3])
    pg_store.abandon(a[3], "w:1", None)
    exact(pg_store)

    # a crashed claim: reaped by the sweep; another taken over by the next claim
    claim(pg_store, a[4])
    expire_lease(pg_store, a[4])
    pg_store.reap(waiting_seconds=None)
    exact(pg_store)
    claim(pg_store, a[5])
    expire_lease(pg_store, a[5])
    c5 = claim(pg_store, a[5])
    exact(pg_store)
    pg_store.complete(a[5], c5.token, Stats(5, 0, 5))

    # completions from several threads at once (several transactions, several slots)
    def run(url: str) -> None:
        c = claim(pg_store, url)
        pg_store.complete(url, c.token, Stats(1, 0, 1))

    threads = [threading.Thread(target=run, args=(u,)) for u in b[:4]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert exact(pg_store)["b"] == {"pending": 2, "completed": 4, "records": 4}

    # cancel: waiting files now, a running one at its next chunk; then requeue brings them back
    running = claim(pg_store, a[6])
    assert pg_store.cancel_batch("a") is not None
    exact(pg_store)
    with pg_store.transaction(token=running.token) as out:
        assert pg_store.commit_chunk(a[6], running.token, {"line": 3}, transaction=out) == 0.0
    assert exact(pg_store)["a"].get("processing") is None
    pg_store.requeue(batch_id="a", statuses=[Status.CANCELLED])
    exact(pg_store)
    pg_store.requeue(batch_id="a")  # dead and failed
    exact(pg_store)
    pg_store.requeue(a[0], force=True, statuses=[Status.COMPLETED])  # completed, with records
    assert exact(pg_store)["a"]["records"] == 5

    # a new generation on a changed fingerprint; a file moved to another batch
    c7 = claim(pg_store, a[7])
    pg_store.complete(a[7], c7.token, Stats(7, 0, 7))
    pg_store.register([(a[7], "v2")], batch_id="b", task_name="t")
    assert exact(pg_store)["b"]["pending"] == 3

    # prune forgets completed files (a DELETE); a TRUNCATE empties the counters too
    pg_store.prune(0.0, forget_completed_older_than=0.0)
    assert "completed" not in exact(pg_store)["b"]
    pg_store.execute_script("TRUNCATE file_checkpoints CASCADE")
    assert pg_store.scalar("SELECT count(*) FROM pipeline_batch_counts") == 0


def test_counts__claims_that_end_a_pending_file_count_it(pg_store: PostgresStore) -> None:
    """The moves out of pending a claim's long way makes itself (migration 0018: counted by
    the claim, not the trigger): no attempts left, and its batch cancelled."""
    pg_store.open_batch(BatchSpec("c", "t", "me"))
    c = urls("c", 3)
    pg_store.register(c[:2], batch_id="c", task_name="t")
    # a pending file with an attempt spent: failed, cancelled, requeued as it stood
    c0 = claim(pg_store, c[0])
    pg_store.fail(c[0], c0.token, "boom", retry_in=0.0)
    assert pg_store.cancel_batch("c") == 2
    pg_store.requeue(batch_id="c", statuses=[Status.CANCELLED])
    assert exact(pg_store)["c"] == {"pending": 2, "records": 0}
    refusal = pg_store.claim(c[0], "w:1", LEASE, max_attempts=1)
    assert not isinstance(refusal, Claim), refusal
    assert refusal.reason == "dead", refusal
    assert exact(pg_store)["c"] == {"pending": 1, "dead": 1, "records": 0}
    # a pending file of a cancelled batch: the claim cancels it (a file registered after the
    # cancel, and one the cancel did not reach)
    assert pg_store.cancel_batch("c") == 1
    pg_store.register(c[2:], batch_id="c", task_name="t")
    assert exact(pg_store)["c"] == {"pending": 1, "dead": 1, "cancelled": 1, "records": 0}
    refusal = pg_store.claim(c[2], "w:1", LEASE)
    assert not isinstance(refusal, Claim), refusal
    assert refusal.reason == "cancelled", refusal
    assert exact(pg_store)["c"] == {"dead": 1, "cancelled": 2, "records": 0}


def test_counts__a_big_cancel_and_requeue_count_in_one_row_per_batch(
    pg_store: PostgresStore,
) -> None:
    files = [f"file:///big/{i}" for i in range(20_000)]
    pg_store.open_batch(BatchSpec("big", "t", "me"))
    pg_store.register(files, batch_id="big", task_name="t")
    assert pg_store.cancel_batch("big") == 20_000
    assert exact(pg_store)["big"] == {"cancelled": 20_000, "records": 0}
    assert len(pg_store.requeue(batch_id="big")) == 20_000
    assert exact(pg_store)["big"] == {"pending": 20_000, "records": 0}


def test_counts__the_migration_counts_the_files_already_there(fresh_database_url: str) -> None:
    dsn = sa.make_url(fresh_database_url).set(drivername="postgresql")
    with psycopg.connect(dsn.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE pipeline_schema_version (version integer PRIMARY KEY, name text NOT"
            " NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for number, name, script in postgres.migrations():
            if number <= 15:
                conn.execute(script)  # type: ignore[arg-type]
                conn.execute(
                    "INSERT INTO pipeline_schema_version (version, name) VALUES (%s, %s)",
                    (number, name),
                )
        conn.execute(
            "INSERT INTO file_checkpoints (file_url, file_type, status, batch_id, records_total,"
            " completed_at, started_at)"
            " SELECT 'file:///old/' || i, 't', (ARRAY['pending', 'completed', 'dead'])[i % 3 + 1],"
            " 'old', 2, now(), now() FROM generate_series(1, 30) i"
        )
    store = PostgresStore(fresh_database_url)
    try:
        store.upgrade()
        assert exact(store)["old"] == {"pending": 10, "completed": 10, "dead": 10, "records": 20}
    finally:
        store.close()
