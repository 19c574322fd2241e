"""Batches on PostgreSQL: the batch row written by submit and read by `status --batch` in one
read; cancel, pause and the concurrency limit decided by the claim (pipeline_claim_v5), a
cancelled running file stopped at its next chunk, and requeue bringing cancelled files back
where they stopped."""

from __future__ import annotations

import threading

from pipeline.models import BatchSpec, BatchState, Claim, Reason, Refusal, Stats, Status, Work
from pipeline.sources import producer
from pipeline.store.postgres import PostgresStore
from tests.support.rows import expire_lease

LEASE = 600.0


def urls(n: int, batch: str = "b") -> list[str]:
    return [f"file:///data/{batch}/{i:03}.jsonl" for i in range(n)]


def submit(
    store: PostgresStore,
    name: str,
    n: int,
    *,
    concurrency: int | None = None,
    on_complete: str | None = None,
) -> list[str]:
    """What `pipeline submit` does to the store: open the batch, register its files."""
    store.open_batch(
        BatchSpec(name, "t", "me@here", concurrency=concurrency, on_complete=on_complete)
    )
    files = urls(n, name)
    store.register(files, batch_id=name, task_name="t")
    return files


def claim(store: PostgresStore, url: str, worker: str = "w:1") -> Claim | Refusal:
    return store.claim(url, worker, LEASE, token=store.reserve_token())


def test_submit__writes_the_batch_row_and_status_reads_it(pg_store: PostgresStore) -> None:
    files = submit(pg_store, "b", 5, concurrency=3)
    first = claim(pg_store, files[0])
    assert isinstance(first, Claim)
    pg_store.complete(files[0], first.token, Stats(1, 0, 1))
    batch = pg_store.batch("b")
    assert batch is not None
    assert (batch.file_count, batch.state, batch.concurrency) == (5, BatchState.OPEN, 3)
    assert (batch.task_name, batch.submitted_by) == ("t", "me@here")
    assert batch.counts == {Status.PENDING: 4, Status.COMPLETED: 1}
    assert batch.completed_last_minute == 1
    assert batch.rate is not None
    assert batch.oldest_waiting_age is not None
    assert batch.oldest_waiting_age >= 0
    assert batch.eta_seconds == 4 / (1 / 60)
    shown = pg_store.overview("b").batch
    assert shown is not None
    assert (shown.name, shown.counts) == ("b", batch.counts)
    assert pg_store.batch("nope") is None


def test_submit__more_files_under_the_same_name_add_to_its_count(pg_store: PostgresStore) -> None:
    submit(pg_store, "b", 3)
    pg_store.register([*urls(3, "b"), "file:///data/b/extra"], batch_id="b", task_name="t")
    batch = pg_store.batch("b")
    assert batch is not None
    assert batch.file_count == 4


def test_submit__the_producer_opens_the_batch_with_its_settings(pg_store: PostgresStore) -> None:
    request = producer.Request(
        batch_id="p", arguments=("file:///x/1", "file:///x/2"), concurrency=2
    )
    sent: list[str] = []
    producer.submit_request(pg_store, request, lambda task, url: sent.append(url))
    batch = pg_store.batch("p")
    assert batch is not None
    assert (batch.file_count, batch.concurrency) == (2, 2)
    assert batch.submitted_by
    assert "@" in batch.submitted_by
    assert len(sent) == 2


def test_cancel__refuses_claims_cancels_waiting_files_and_requeue_resumes_them(
    pg_store: PostgresStore,
) -> None:
    files = submit(pg_store, "b", 4)
    running = claim(pg_store, files[0])
    assert isinstance(running, Claim)
    assert pg_store.cancel_batch("b") == 3
    assert pg_store.cancel_batch("nope") is None
    refused = claim(pg_store, files[1])
    assert isinstance(refused, Refusal)
    assert refused.reason is Reason.CANCELLED
    assert pg_store.batch("b").counts == {Status.PROCESSING: 1, Status.CANCELLED: 3}  # type: ignore[union-attr]

    # The running file stops at its next chunk: the chunk commits, the file is cancelled.
    with pg_store.transaction(token=running.token) as out:
        left = pg_store.commit_chunk(files[0], running.token, {"line": 7}, transaction=out)
    assert left == 0.0
    row = pg_store.get(files[0], with_attempts=True)
    assert row is not None
    assert row.status is Status.CANCELLED
    assert row.position == {"line": 7}
    assert [a.outcome.value for a in row.attempts] == ["cancelled"]
    assert row.attempts_spent == 0

    work = pg_store.requeue(batch_id="b")
    assert sorted(w.file_url for w in work) == files
    assert pg_store.batch("b").state is BatchState.OPEN  # type: ignore[union-attr]
    again = claim(pg_store, files[0])
    # Back where it stopped: same generation, from its last chunk.
    assert isinstance(again, Claim)
    assert again.position == {"line": 7}
    assert again.generation == 1


def test_cancel__a_failed_file_waiting_for_its_retry_is_cancelled_too(
    pg_store: PostgresStore,
) -> None:
    (url,) = submit(pg_store, "b", 1)
    c = claim(pg_store, url)
    assert isinstance(c, Claim)
    pg_store.fail(url, c.token, "boom", retry_in=0.0)
    pg_store.cancel_batch("b")
    assert pg_store.get(url).status is Status.CANCELLED  # type: ignore[union-attr]


def test_cancel__an_expired_claim_is_cancelled_by_the_sweep_not_handed_out(
    pg_store: PostgresStore,
) -> None:
    (url,) = submit(pg_store, "b", 1)
    assert isinstance(claim(pg_store, url), Claim)
    pg_store.cancel_batch("b")
    expire_lease(pg_store, url)
    assert pg_store.reap(waiting_seconds=0.0) == []
    assert pg_store.get(url).status is Status.CANCELLED  # type: ignore[union-attr]


def test_pause__holds_claims_without_an_attempt_and_resume_hands_the_files_back(
    pg_store: PostgresStore,
) -> None:
    files = submit(pg_store, "b", 3)
    assert pg_store.pause_batch("b") is BatchState.PAUSED
    refused = claim(pg_store, files[0])
    assert isinstance(refused, Refusal)
    assert refused.reason is Reason.PAUSED
    row = pg_store.get(files[0])
    assert row is not None
    assert row.status is Status.PENDING
    assert row.attempt == 0
    # The sweep hands out no file of a paused batch, however long it waited.
    pg_store.execute_script("UPDATE file_checkpoints SET updated_at = now() - interval '1 hour'")
    assert pg_store.reap(waiting_seconds=1.0) == []
    work = pg_store.resume_batch("b")
    assert work is not None
    assert sorted(w.file_url for w in work) == files
    assert pg_store.resume_batch("b") is None  # not paused any more
    granted = claim(pg_store, files[0])
    assert isinstance(granted, Claim)
    assert granted.attempt == 1


def test_pause__a_cancelled_batch_stays_cancelled(pg_store: PostgresStore) -> None:
    submit(pg_store, "b", 1)
    pg_store.cancel_batch("b")
    assert pg_store.pause_batch("b") is BatchState.CANCELLED
    assert pg_store.pause_batch("nope") is None


def test_concurrency__claims_beyond_the_limit_are_refused_not_now(
    pg_store: PostgresStore,
) -> None:
    files = submit(pg_store, "b", 4, concurrency=2)
    first, second = claim(pg_store, files[0]), claim(pg_store, files[1])
    assert isinstance(first, Claim)
    assert isinstance(second, Claim)
    third = claim(pg_store, files[2])
    assert isinstance(third, Refusal)
    assert third.reason is Reason.LIMITED
    row = pg_store.get(files[2])
    assert row is not None
    assert row.status is Status.PENDING
    assert row.attempt == 0
    # Another batch is not held by this one's limit.
    (other,) = submit(pg_store, "small", 1)
    assert isinstance(claim(pg_store, other), Claim)
    # The refused file was held (its message let go): the ending that frees a slot sends it.
    assert pg_store.complete(files[0], first.token, Stats()) == Work(files[2], "t", Status.PENDING)
    assert isinstance(claim(pg_store, files[2]), Claim)
    # An expired claim does not count as running.
    expire_lease(pg_store, files[1])
    assert isinstance(claim(pg_store, files[3]), Claim)


def test_concurrency__concurrent_claims_never_exceed_the_limit(pg_store: PostgresStore) -> None:
    files = submit(pg_store, "b", 12, concurrency=3)
    results: list[Claim | Refusal] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def grab(mine: list[str]) -> None:
        # A store (and a connection) of its own per thread, closed in that thread.
        store = PostgresStore(pg_store.url)
        try:
            start.wait()
            for url in mine:
                r = claim(store, url, f"w:{threading.get_ident()}")
                with lock:
                    results.append(r)
        finally:
            store.close()

    threads = [threading.Thread(target=grab, args=(files[i::6],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 12
    assert sum(isinstance(r, Claim) for r in results) == 3
    assert all(r.reason is Reason.LIMITED for r in results if isinstance(r, Refusal))
    assert pg_store.batch("b").counts[Status.PROCESSING] == 3  # type: ignore[union-attr]


def finish(store: PostgresStore, url: str, *, dead: bool = False) -> Work | None:
    """Claim and end `url` (completed, or dead); the batch callback its ending created."""
    c = claim(store, url)
    assert isinstance(c, Claim), c
    if dead:
        return store.fail(url, c.token, "bad row 7", retryable=False).follow_up
    return store.complete(url, c.token, Stats(1, 0, 1))


def test_callback__created_once_by_the_ending_that_makes_the_batch_terminal(
    pg_store: PostgresStore,
) -> None:
    files = submit(pg_store, "b", 3, on_complete="report")
    assert finish(pg_store, files[0]) is None
    assert finish(pg_store, files[1]) is None  # one file still pending: not yet
    # The last file ends dead: it fires all the same, created by that ending and handed to
    # its worker to send.
    assert finish(pg_store, files[2], dead=True) == Work("batch:b#1", "report", Status.PENDING)
    assert pg_store.reap(waiting_seconds=None) == []  # settled: never a second one
    batch = pg_store.batch("b")
    assert batch is not None
    assert (batch.state, batch.callbacks) == (BatchState.DONE, 1)
    summary = pg_store.callback_summary("batch:b#1")
    assert summary is not None
    assert summary["batch"] == "b"
    assert summary["counts"] == {"completed": 2, "dead": 1}
    assert [(d["file_url"], d["error"]) for d in summary["dead"]] == [(files[2], "bad row 7")]
    assert pg_store.callback_summary(files[0]) is None
    # The callback is claimed and fenced like a file, and has no batch: its own completion
    # creates nothing; once completed, a copy is refused done.
    assert finish(pg_store, "batch:b#1") is None
    again = claim(pg_store, "batch:b#1")
    assert isinstance(again, Refusal)
    assert again.reason is Reason.DONE


def test_callback__never_sent_by_its_worker_the_sweep_hands_it_back(
    pg_store: PostgresStore,
) -> None:
    """The worker killed between its commit and the send: the callback row waits pending, and
    the sweep's waiting rule sends it; no second one is created."""
    (url,) = submit(pg_store, "b", 1, on_complete="report")
    assert finish(pg_store, url) == Work("batch:b#1", "report", Status.PENDING)
    assert pg_store.reap(waiting_seconds=None) == []
    assert pg_store.reap(waiting_seconds=0.0) == [Work("batch:b#1", "report", Status.PENDING)]
    assert pg_store.batch("b").callbacks == 1  # type: ignore[union-attr]


def test_callback__an_ending_no_worker_settled_is_settled_by_the_sweep(
    pg_store: PostgresStore,
) -> None:
    """The batch's last file ends by the sweep (its worker lost, no attempt left): the sweep
    settles the batch and hands back its callback with the rest."""
    (url,) = submit(pg_store, "b", 1, on_complete="report")
    c = pg_store.claim(url, "w:1", LEASE, max_attempts=1, token=pg_store.reserve_token())
    assert isinstance(c, Claim), c
    expire_lease(pg_store, url)
    work = pg_store.reap(waiting_seconds=None)
    assert sorted((w.file_url, w.status) for w in work) == [
        ("batch:b#1", Status.PENDING),
        (url, Status.DEAD),
    ]
    assert pg_store.reap(waiting_seconds=None) == []


def test_callback__the_last_two_files_ending_at_once_create_it_once(
    pg_store: PostgresStore,
) -> None:
    """Two completions in flight at once, each seeing the other's file still processing: the
    later one waits for the batch row until the earlier committed, then sees both ended and
    creates the callback; the earlier one creates none."""
    a, b = submit(pg_store, "b", 2, on_complete="report")
    ca, cb = claim(pg_store, a), claim(pg_store, b)
    assert isinstance(ca, Claim)
    assert isinstance(cb, Claim)
    got: list[Work | None] = []
    with pg_store.transaction(token=ca.token) as first:
        assert pg_store.complete(a, ca.token, Stats(1, 0, 1), transaction=first) is None

        def second() -> None:
            with pg_store.transaction(token=cb.token) as tx:
                got.append(pg_store.complete(b, cb.token, Stats(1, 0, 1), transaction=tx))

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive()  # waiting for the batch row the first one holds
    thread.join(timeout=10)
    assert got == [Work("batch:b#1", "report", Status.PENDING)]
    assert pg_store.reap(waiting_seconds=None) == []
    assert pg_store.batch("b").callbacks == 1  # type: ignore[union-attr]


def test_callback__a_batch_that_grows_after_completing_fires_again_once(
    pg_store: PostgresStore,
) -> None:
    (first,) = submit(pg_store, "b", 1, on_complete="report")
    assert finish(pg_store, first) == Work("batch:b#1", "report", Status.PENDING)
    pg_store.register(["file:///data/b/later"], batch_id="b", task_name="t")
    assert pg_store.batch("b").state is BatchState.OPEN  # type: ignore[union-attr]
    assert pg_store.reap(waiting_seconds=None) == []
    assert finish(pg_store, "file:///data/b/later") == Work("batch:b#2", "report", Status.PENDING)
    assert pg_store.reap(waiting_seconds=None) == []
    summary = pg_store.callback_summary("batch:b#2")
    assert summary is not None
    assert (summary["files"], summary["counts"]) == (2, {"completed": 2})


def test_callback__a_requeue_that_ends_as_before_does_not_fire_again(
    pg_store: PostgresStore,
) -> None:
    (url,) = submit(pg_store, "b", 1, on_complete="report")
    assert finish(pg_store, url, dead=True) is not None
    pg_store.requeue(batch_id="b")
    assert pg_store.batch("b").state is BatchState.OPEN  # type: ignore[union-attr]
    assert finish(pg_store, url) is None
    assert pg_store.reap(waiting_seconds=None) == []
    assert pg_store.batch("b").state is BatchState.DONE  # type: ignore[union-attr]


def test_callback__a_batch_without_one_is_only_marked_done(pg_store: PostgresStore) -> None:
    (url,) = submit(pg_store, "b", 1)
    finish(pg_store, url)
    assert pg_store.reap(waiting_seconds=None) == []
    assert pg_store.batch("b").state is BatchState.DONE  # type: ignore[union-attr]
