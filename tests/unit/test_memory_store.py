"""What only the in-memory twin can show: its clock, its lock, its transaction."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from pipeline import errors
from pipeline.models import Claim, Reason, Refusal, Stats, Status
from pipeline.store.memory import ManualClock, MemoryStore

URL = "file:///data/a.csv"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(clock: ManualClock) -> MemoryStore:
    return MemoryStore(clock=clock)


def test_claim__busy_reports_exactly_the_time_left_on_the_lease(
    store: MemoryStore, clock: ManualClock
) -> None:
    assert isinstance(store.claim(URL, "w1", 30.0), Claim)
    clock.advance(12)
    refusal = store.claim(URL, "w2", 30.0)
    assert refusal == Refusal(URL, Reason.BUSY, retry_in=18.0)


def test_claim__lease_runs_out_with_the_clock_not_before(
    store: MemoryStore, clock: ManualClock
) -> None:
    assert isinstance(store.claim(URL, "w1", 30.0), Claim)
    clock.advance(29.999)
    assert isinstance(store.claim(URL, "w2", 30.0), Refusal)
    clock.advance(0.001)  # the lease ends now: expired, as `lease_expires_at > now()` says
    taken = store.claim(URL, "w2", 30.0)
    assert isinstance(taken, Claim)
    assert taken.attempt == 2


def test_heartbeat__moves_the_lease_end_to_now_plus_the_lease(
    store: MemoryStore, clock: ManualClock
) -> None:
    claim = store.claim(URL, "w1", 30.0)
    assert isinstance(claim, Claim)
    clock.advance(20)
    assert store.heartbeat(URL, claim.token) == 30.0
    row = store.get(URL)
    assert row is not None
    assert row.lease_expires_at == clock() + dt.timedelta(seconds=30)


def test_reap__hands_waiting_rows_back_after_waiting_seconds_and_touches_them(
    store: MemoryStore, clock: ManualClock
) -> None:
    store.register([URL], task_name="t")
    clock.advance(100)
    assert store.reap(waiting_seconds=120) == []
    clock.advance(20)
    assert [(w.file_url, w.status) for w in store.reap(waiting_seconds=120)] == [
        (URL, Status.PENDING)
    ]
    # Touched: the next sweep waits another 120 s.
    clock.advance(119)
    assert store.reap(waiting_seconds=120) == []
    clock.advance(1)
    assert len(store.reap(waiting_seconds=120)) == 1


def test_reap__limit_applies_to_each_sweep_oldest_first(
    store: MemoryStore, clock: ManualClock
) -> None:
    for i in range(3):
        store.register([f"file:///w/{i}"])
        clock.advance(1)
    clock.advance(200)
    assert [w.file_url for w in store.reap(waiting_seconds=120, limit=2)] == [
        "file:///w/0",
        "file:///w/1",
    ]


def test_complete__measures_the_processing_time_on_the_clock(
    store: MemoryStore, clock: ManualClock
) -> None:
    claim = store.claim(URL, "w1", 30.0)
    assert isinstance(claim, Claim)
    clock.advance(1.5)
    store.complete(URL, claim.token, Stats(1, 0, 1))
    row = store.get(URL)
    assert row is not None
    assert row.processing_time_ms == 1500
    assert row.completed_at == clock()


def test_complete__details_must_be_json(store: MemoryStore) -> None:
    claim = store.claim(URL, "w1")
    assert isinstance(claim, Claim)
    with pytest.raises(TypeError):
        store.complete(URL, claim.token, details={"when": object()})
    assert store.get(URL).status is Status.PROCESSING  # type: ignore[union-attr]


def test_clock__may_give_epoch_seconds() -> None:
    store = MemoryStore(clock=lambda: 1_700_000_000.0)
    store.register([URL])
    row = store.get(URL)
    assert row is not None
    assert row.created_at == dt.datetime.fromtimestamp(1_700_000_000, dt.UTC)


def test_manual_clock__does_not_go_back(clock: ManualClock) -> None:
    start = clock()
    assert clock.advance(5) == start + dt.timedelta(seconds=5)
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1)


def test_claims__threads_racing_on_the_same_files_get_one_grant_each() -> None:
    store = MemoryStore()
    urls = [f"file:///race/{i}" for i in range(300)]
    barrier = threading.Barrier(8)
    grants: list[str] = []

    def racer(name: str) -> None:
        barrier.wait()
        mine = [u for u in urls if isinstance(store.claim(u, name, 60.0), Claim)]
        grants.extend(mine)

    threads = [threading.Thread(target=racer, args=(f"t{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(grants) == sorted(urls)


def test_transaction__cannot_be_used_once_closed(store: MemoryStore) -> None:
    claim = store.claim(URL, "w1")
    assert isinstance(claim, Claim)
    with store.transaction(token=claim.token) as tx:
        assert tx.connection is None
    with pytest.raises(errors.PipelineError, match="closed"):
        store.complete(URL, claim.token, transaction=tx)
    assert store.get(URL).status is Status.PROCESSING  # type: ignore[union-attr]


def test_unavailable__only_for_store_unavailable(store: MemoryStore) -> None:
    assert store.unavailable(errors.StoreUnavailable())
    assert not store.unavailable(RuntimeError("boom"))
