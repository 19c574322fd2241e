"""A batch's concurrency limit on PostgreSQL (migration 0023): the broker holds only a window
of a limited batch's files. Submit sends messages for twice the limit and registers the rest
`held`; a claim refused at the limit holds its file and lets its message go; each ending of one
of the batch's files (completed, failed, dead) releases the next held file, to send after its
commit; the sweep never takes a held file for lost and releases a batch stalled with all its
files held; resume and cancel know about held files."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pipeline.models import Claim, Reason, Refusal, Stats, Status, Work
from pipeline.sources import producer
from pipeline.store.postgres import PostgresStore
from tests.integration.test_batches import claim, submit, urls


def held(store: PostgresStore, batch: str) -> set[str]:
    found = store.scalar(
        "SELECT array_agg(file_url) FROM file_checkpoints WHERE batch_id = :b AND held",
        {"b": batch},
    )
    return set(found or ())


def execute(store: PostgresStore, sql: str) -> None:
    store.scalar(f"WITH done AS ({sql} RETURNING 1) SELECT count(*) FROM done")


def producer_submit(
    store: PostgresStore, batch: str, files: list[str], limit: int
) -> tuple[producer.SubmitReport, list[str]]:
    sent: list[str] = []
    report = producer.submit_request(
        store,
        producer.Request(batch_id=batch, arguments=tuple(files), concurrency=limit, task_name="t"),
        lambda task, url: sent.append(url),
    )
    return report, sent


def urls_of(store: PostgresStore, batch: str, numbers: range) -> list[str]:
    """Register more files into `batch` (a submit after the first)."""
    files = urls(numbers.stop, batch)[numbers.start :]
    store.register(files, batch_id=batch, task_name="t")
    return files


def test_submit__sends_twice_the_limit_and_holds_the_rest(pg_store: PostgresStore) -> None:
    files = urls(20, "big")
    report, sent = producer_submit(pg_store, "big", files, 2)
    assert sorted(sent) == files[:4]
    assert (report.enqueued, report.held, report.in_flight_before) == (4, 16, 0)
    assert held(pg_store, "big") == set(files[4:])
    # The same input again: the files with a message out are sent again (theirs may have been
    # lost), the held ones are not.
    report, sent = producer_submit(pg_store, "big", files, 2)
    assert sorted(sent) == files[:4]
    assert report.held == 16
    # More files under the same name: the window is full, all held.
    more = urls(25, "big")[20:]
    report, sent = producer_submit(pg_store, "big", more, 2)
    assert (sent, report.held) == ([], 5)
    # A batch without a limit is not held at all.
    report = producer.submit_request(
        pg_store,
        producer.Request(batch_id="free", arguments=tuple(urls(10, "free"))),
        lambda task, url: None,
    )
    assert (report.enqueued, report.held) == (10, 0)


def drain(
    store: PostgresStore, queue: list[str], limit: int, *, fail_every: int = 0
) -> dict[str, int]:
    """Work the queue as twice `limit` workers would, first in first out: each round, the
    workers not running a file take a message each and claim it; then the oldest running file
    ends (completed; or, every `fail_every`th, failed with its retry message at the queue's
    end) and what its ending released is sent. Counts of what happened."""
    seen = {"messages": 0, "granted": 0, "failed": 0, "limited": 0, "done": 0}
    seen["max_queue"] = len(queue)
    running: list[Claim] = []
    ended = 0
    while queue or running:
        for _ in range(min(len(queue), 2 * limit - len(running))):
            url = queue.pop(0)
            seen["messages"] += 1
            r = claim(store, url)
            if isinstance(r, Refusal):
                seen["limited" if r.reason is Reason.LIMITED else "done"] += 1
            else:
                seen["granted"] += 1
                running.append(r)
        if not running:
            continue
        c = running.pop(0)
        ended += 1
        if fail_every and ended % fail_every == 0:
            outcome = store.fail(c.file_url, c.token, "flaky", retryable=True, retry_in=0.0)
            assert outcome.status is Status.FAILED
            seen["failed"] += 1
            queue.append(c.file_url)  # Celery's retry message
            follow = outcome.follow_up
        else:
            follow = store.complete(c.file_url, c.token, Stats(1, 0, 1))
        if follow is not None:
            queue.append(follow.file_url)
        seen["max_queue"] = max(seen["max_queue"], len(queue))
    return seen


def test_endings_release_held_files_until_every_file_completed_once(
    pg_store: PostgresStore,
) -> None:
    files = urls(60, "big")
    _, queue = producer_submit(pg_store, "big", files, 3)
    assert len(queue) == 6
    seen = drain(pg_store, queue, 3, fail_every=7)
    batch = pg_store.batch("big")
    assert batch is not None
    assert batch.counts.get(Status.COMPLETED) == 60
    assert not held(pg_store, "big")
    # Each file granted once, plus one per retried failure; the queue never held more than the
    # window (and the retry messages): no backlog of the batch in the broker.
    assert seen["failed"] > 5
    assert seen["granted"] == 60 + seen["failed"]
    assert seen["max_queue"] <= 6 + 1
    assert seen["limited"] > 0
    assert seen["done"] == 0


def test_a_refused_claim_holds_its_file_and_the_next_ending_sends_it(
    pg_store: PostgresStore,
) -> None:
    files = submit(pg_store, "b", 4, concurrency=1)
    assert held(pg_store, "b") == set(files[2:])  # a message each for the first two
    first = claim(pg_store, files[0])
    assert isinstance(first, Claim)
    r = claim(pg_store, files[1])
    assert isinstance(r, Refusal)
    assert r.reason is Reason.LIMITED
    assert r.retry_in is None
    assert held(pg_store, "b") == set(files[1:])
    # A failure with a retry frees the slot: a held file (of the oldest submit: here all three
    # came in one) is sent.
    outcome = pg_store.fail(files[0], first.token, "flaky", retryable=True, retry_in=60.0)
    assert outcome.status is Status.FAILED
    assert outcome.follow_up is not None
    assert outcome.follow_up.task_name == "t"
    one = outcome.follow_up.file_url
    assert held(pg_store, "b") == set(files[1:]) - {one}
    second = claim(pg_store, one)
    assert isinstance(second, Claim)
    # A dead ending frees it too.
    outcome = pg_store.fail(one, second.token, "bad", retryable=False)
    assert outcome.status is Status.DEAD
    assert outcome.follow_up is not None
    assert held(pg_store, "b") == set(files[1:]) - {one, outcome.follow_up.file_url}


def test_held_files_are_released_oldest_submitted_first(pg_store: PostgresStore) -> None:
    early = submit(pg_store, "b", 6, concurrency=1)
    pg_store.scalar("SELECT pg_sleep(0.01)")  # a later submit, a later time
    late = urls_of(pg_store, "b", range(6, 9))
    running = claim(pg_store, early[0])
    assert isinstance(running, Claim)
    released = pg_store.complete(early[0], running.token, Stats())
    assert released is not None
    assert released.file_url in early[2:]
    assert held(pg_store, "b") >= set(late)


def end_and_claim_at_once(
    stores: list[PostgresStore], ending: Claim, other: str
) -> tuple[Work | None, Claim | Refusal]:
    """Complete `ending` on one connection while `other` is claimed on another, together."""
    results: dict[str, Any] = {}
    start = threading.Barrier(2)

    def end() -> None:
        start.wait()
        results["end"] = stores[0].complete(ending.file_url, ending.token, Stats())

    def grab() -> None:
        start.wait()
        results["claim"] = claim(stores[1], other, "w:2")

    threads = [threading.Thread(target=end), threading.Thread(target=grab)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results["end"], results["claim"]


def test_a_claim_holding_its_file_and_the_last_ending_never_both_miss(
    pg_store: PostgresStore,
) -> None:
    """The race the shared lock closes: the only running file ends while another file's claim
    is refused. Either the claim is granted (the ending committed first) or the ending releases
    the file the claim held; never a held file with nothing running to release it."""
    stores = [PostgresStore(pg_store.url) for _ in range(2)]
    try:
        for run in range(30):
            files = submit(pg_store, f"race{run}", 2, concurrency=1)
            running = claim(pg_store, files[0])
            assert isinstance(running, Claim)
            released, got = end_and_claim_at_once(stores, running, files[1])
            if isinstance(got, Claim):
                assert released is None
            else:
                assert got.reason is Reason.LIMITED
                assert released == Work(files[1], "t", Status.PENDING), run
    finally:
        for s in stores:
            s.close()


def test_the_sweep_skips_held_files_and_releases_a_stalled_batch(
    pg_store: PostgresStore,
) -> None:
    files = urls(12, "big")
    _, sent = producer_submit(pg_store, "big", files, 2)
    (lone,) = submit(pg_store, "other", 1)
    execute(pg_store, "UPDATE file_checkpoints SET updated_at = now() - interval '1 hour'")
    # The four files with a message out waited long: they and the other batch's file are sent
    # again. Held files are not lost: never sent by the waiting rule.
    handed = {w.file_url for w in pg_store.reap(waiting_seconds=60.0)}
    assert handed == set(sent) | {lone}
    # Those four all claimed and refused somehow (a limit lowered, say): the batch has held
    # files only, nothing running, nothing with a message. The sweep releases its limit's worth.
    execute(pg_store, "UPDATE file_checkpoints SET held = true WHERE batch_id = 'big'")
    handed = [w.file_url for w in pg_store.reap(waiting_seconds=60.0)]
    assert len(handed) == 2
    assert held(pg_store, "big") == set(files) - set(handed)
    # Released and waiting for their messages: not stalled, nothing more.
    assert [w.file_url for w in pg_store.reap(waiting_seconds=60.0)] == []


def test_resume_sends_the_window_and_cancel_clears_held(pg_store: PostgresStore) -> None:
    files = urls(20, "big")
    producer_submit(pg_store, "big", files, 2)
    pg_store.pause_batch("big")
    for url in files[:4]:
        r = claim(pg_store, url)
        assert isinstance(r, Refusal)
        assert r.reason is Reason.PAUSED
    work = pg_store.resume_batch("big")
    assert work is not None
    # The four with a message out (dropped while paused), and four held files released.
    again = {w.file_url for w in work}
    assert len(work) == len(again) == 8
    assert set(files[:4]) <= again
    assert held(pg_store, "big") == set(files) - again
    pg_store.cancel_batch("big")
    assert held(pg_store, "big") == set()
    back = pg_store.requeue(batch_id="big", statuses=[Status.CANCELLED])
    assert sorted(w.file_url for w in back) == files


@pytest.mark.parametrize("limit", [1, 4])
def test_a_limit_set_on_an_existing_batch_holds_its_new_files(
    pg_store: PostgresStore, limit: int
) -> None:
    first = urls(3, "b")
    producer.submit_request(
        pg_store, producer.Request(batch_id="b", arguments=tuple(first)), lambda t, u: None
    )
    more = urls(3 + 3 * limit, "b")[3:]
    report, sent = producer_submit(pg_store, "b", more, limit)
    # Three files already have their messages: the window has 2 x limit - 3 places left.
    places = max(0, 2 * limit - 3)
    assert sorted(sent) == more[:places]
    assert report.held == len(more) - places
