"""A batch's concurrency limit on PostgreSQL (migration 0021): a claim refused as `limited`
comes back later the longer the batch's backlog (its files waiting times its pace so far), at
random, between 1 s and 300 s; and the refused row is marked with the time its message comes
back, so that the sweep sends no copy of a file waiting behind the limit."""

from __future__ import annotations

import time

from pipeline.models import Claim, Reason, Refusal, Stats
from pipeline.store.postgres import PostgresStore
from tests.integration.test_batches import claim, submit


def refused_in(store: PostgresStore, url: str) -> float:
    r = claim(store, url)
    assert isinstance(r, Refusal), r
    assert r.reason is Reason.LIMITED
    assert r.retry_in is not None
    return r.retry_in


def run_two_for(store: PostgresStore, batch: str, files: list[str], seconds: float) -> None:
    """Complete the batch's first two files as if they had taken `seconds` from the first start
    to the last end (its pace: seconds / 2 per file), then claim the next two (its limit)."""
    for url in files[:2]:
        c = claim(store, url)
        assert isinstance(c, Claim)
        store.complete(url, c.token, Stats())
    store.scalar(
        "UPDATE pipeline_batch_counts SET first_started_at = first_started_at"
        " - make_interval(secs => :s) WHERE batch = :b AND first_started_at IS NOT NULL"
        " RETURNING 1",
        {"s": seconds, "b": batch},
    )
    for url in files[2:4]:
        assert isinstance(claim(store, url), Claim)


def test_limited__before_any_completion_the_refused_claim_comes_back_within_a_second(
    pg_store: PostgresStore,
) -> None:
    files = submit(pg_store, "b", 30, concurrency=1)
    assert isinstance(claim(pg_store, files[0]), Claim)
    waits = [refused_in(pg_store, url) for url in files[1:]]
    assert all(0.05 - 1e-9 <= w <= 1.0 for w in waits), waits
    assert len(set(waits)) > 1  # jittered: the refused messages do not come back together


def test_limited__the_wait_grows_with_the_backlog_and_its_pace_up_to_300_s(
    pg_store: PostgresStore,
) -> None:
    # 4 of 14 files claimed or done, 10 waiting, 5 s a file so far: 50 s to drain them.
    files = submit(pg_store, "b", 14, concurrency=2)
    run_two_for(pg_store, "b", files, 10.0)
    waits = [refused_in(pg_store, url) for url in files[4:]]
    assert all(0.05 * 45 <= w <= 55 for w in waits), waits
    assert max(waits) > 10  # not the second it used to be
    assert len(set(waits)) > 1

    # 404 files, 400 waiting at 5 s a file: 2,000 s to drain, capped at 300 s.
    files = submit(pg_store, "big", 404, concurrency=2)
    run_two_for(pg_store, "big", files, 10.0)
    waits = [refused_in(pg_store, url) for url in files[4:40]]
    assert all(0.05 * 300 - 1e-6 <= w <= 300 for w in waits), waits
    assert max(waits) > 100


def test_limited__the_sweep_sends_no_copy_of_a_file_whose_refused_message_comes_back_later(
    pg_store: PostgresStore,
) -> None:
    files = submit(pg_store, "b", 14, concurrency=2)
    run_two_for(pg_store, "b", files, 10.0)
    (waiting,) = submit(pg_store, "other", 1)  # a pending file nobody refused
    refused = files[4:]
    waits = {url: refused_in(pg_store, url) for url in refused}
    time.sleep(1.2)
    handed = {w.file_url for w in pg_store.reap(waiting_seconds=1.0)}
    # The file of the other batch waited past 1 s and its message may be lost: sent again.
    # A refused file waits for its own message, due in `retry_in`.
    assert waiting in handed
    early = {url for url, w in waits.items() if w > 1.5}
    assert early
    assert not early & handed
