"""The gap rule on the real database (pipeline_contact_v1, pipeline_reap_v5): a lease that ran
out while the database answered nobody is not a worker's crash; only a holder that stays
silent after the database is back loses its file, one lease later.

The gap itself is made by moving the fleet's last contact back (what a database away for 60 s
leaves behind); the acceptance tests stop a real server for it
(`tests/acceptance/test_database_trouble.py`).
"""

from __future__ import annotations

import time

from pipeline.models import Claim, Status
from pipeline.store.postgres import PostgresStore

URL = "file:///gap/a.jsonl"


def _claimed(store: PostgresStore, url: str = URL, lease: float = 2.0) -> Claim:
    store.register([url], task_name="t")
    claim = store.claim(url, "w1", lease)
    assert isinstance(claim, Claim)
    return claim


def _gap(store: PostgresStore, seconds: float) -> None:
    """As if the database had answered nobody for the last `seconds`: the claim was renewed
    half a lease before the gap began (live then, out since)."""
    store.execute_script(
        f"UPDATE pipeline_fleet_contact SET answered_at = clock_timestamp()"
        f" - interval '{seconds} seconds';"
        " UPDATE file_checkpoints c"
        "    SET lease_expires_at = f.answered_at + make_interval(secs => c.lease_seconds / 2),"
        "        updated_at = f.answered_at - make_interval(secs => c.lease_seconds / 2)"
        "   FROM pipeline_fleet_contact f WHERE c.status = 'processing'"
    )


def test_gap__a_lease_that_ran_out_while_nobody_could_reach_the_database_is_not_reaped(
    pg_store: PostgresStore,
) -> None:
    claim = _claimed(pg_store)
    _gap(pg_store, 60)
    assert pg_store.reap(waiting_seconds=None, gap_seconds=2.0) == []
    row = pg_store.get(URL)
    assert row is not None
    assert (row.status, row.token, row.attempt) == (Status.PROCESSING, claim.token, 1)
    left = pg_store.scalar(
        "SELECT extract(epoch FROM lease_expires_at - clock_timestamp()) FROM file_checkpoints"
    )
    # The gap given back, never more than a full lease from now.
    assert 0 < float(left) <= 2.0
    gap = pg_store.scalar("SELECT leases_extended FROM pipeline_fleet_contact")
    assert gap == 1
    # The holder is alive: its renewal keeps the file.
    assert pg_store.heartbeat(URL, claim.token) is not None


def test_gap__a_holder_silent_after_the_database_is_back_loses_its_file_one_lease_later(
    pg_store: PostgresStore,
) -> None:
    _claimed(pg_store, lease=1.0)
    _gap(pg_store, 60)
    assert pg_store.reap(waiting_seconds=None, gap_seconds=2.0) == []
    time.sleep(1.2)  # the holder stays silent past the lease given back
    reaped = pg_store.reap(waiting_seconds=None, gap_seconds=2.0)
    assert [(w.file_url, w.status) for w in reaped] == [(URL, Status.FAILED)]
    row = pg_store.get(URL, with_attempts=True)
    assert row is not None
    assert [a.outcome for a in row.attempts] == ["lost"]


def test_no_gap__an_expired_lease_is_reaped_at_once(pg_store: PostgresStore) -> None:
    _claimed(pg_store)
    _gap(pg_store, 1.5)  # the fleet answered 1.5 s ago: no gap (2 s)
    reaped = pg_store.reap(waiting_seconds=None, gap_seconds=2.0)
    assert [(w.file_url, w.status) for w in reaped] == [(URL, Status.FAILED)]


def test_gap__a_lease_renewed_within_the_threshold_is_not_extended(
    pg_store: PostgresStore,
) -> None:
    # Its holder had an answer 1.5 s ago (under the 2 s threshold): the database was there for
    # it, and its short lease ran out all the same.
    _claimed(pg_store, lease=1.0)
    pg_store.execute_script(
        "UPDATE pipeline_fleet_contact SET answered_at = clock_timestamp() - interval '60 s';"
        " UPDATE file_checkpoints SET lease_expires_at = clock_timestamp() - interval '0.5 s',"
        "   updated_at = clock_timestamp() - interval '1.5 s'"
    )
    reaped = pg_store.reap(waiting_seconds=None, gap_seconds=2.0)
    assert [w.file_url for w in reaped] == [URL]


def test_gap__a_pending_row_that_waited_through_it_is_handed_back_at_once(
    pg_store: PostgresStore,
) -> None:
    pg_store.register([URL], task_name="t")  # its message acked while no claim was possible
    pg_store.execute_script(
        "UPDATE pipeline_fleet_contact SET answered_at = clock_timestamp() - interval '60 s'"
    )
    # Not after the 120 s waiting rule: the first sweep after the gap hands it back.
    reaped = pg_store.reap(waiting_seconds=120.0, gap_seconds=2.0)
    assert [(w.file_url, w.status) for w in reaped] == [(URL, Status.PENDING)]
    # Once: the next sweep leaves it to its message.
    assert pg_store.reap(waiting_seconds=120.0, gap_seconds=2.0) == []


def test_heartbeat_of_a_worker__makes_the_gap_good_before_any_sweep(
    pg_store: PostgresStore,
) -> None:
    claim = _claimed(pg_store)
    _gap(pg_store, 60)
    pg_store.worker_seen("w@host", 1, 1.0)  # the first contact after the gap is a heartbeat
    assert pg_store.reap(waiting_seconds=None, gap_seconds=2.0) == []
    row = pg_store.get(URL)
    assert row is not None
    assert (row.status, row.token) == (Status.PROCESSING, claim.token)
