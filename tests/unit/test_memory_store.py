"""What only the in-memory store shows: its log of calls, and `mark` standing in for the state
machine (which is tested on PostgreSQL)."""

from __future__ import annotations

from pipeline.models import Change, Stats, Status
from pipeline.store.memory import MemoryStore

URL = "file:///data/a.csv"


def test_calls__every_call_is_logged_in_order() -> None:
    store = MemoryStore()
    store.register([URL, URL], batch_id="b")
    store.summary("b")
    store.requeue(URL)
    assert [name for name, _ in store.calls] == ["register", "summary", "requeue"]
    assert store.calls[0] == ("register", [(URL, None), (URL, None)])


def test_mark__a_completed_file_keeps_its_stats_and_is_not_enqueued_again() -> None:
    store = MemoryStore()
    store.register([(URL, "etag-1")])
    store.mark(URL, Status.COMPLETED, stats=Stats(3, 1, 2))
    row = store.get(URL)
    assert row is not None
    assert (row.status, row.stats) == (Status.COMPLETED, Stats(3, 1, 2))
    (again,) = store.register([(URL, "etag-1")])
    assert (again.status, again.needs_task, again.change) == (
        Status.COMPLETED,
        False,
        Change.UNCHANGED,
    )


def test_mark__a_changed_fingerprint_of_a_dead_file_starts_a_new_generation() -> None:
    store = MemoryStore()
    store.register([(URL, "etag-1")])
    store.mark(URL, Status.DEAD, error="boom")
    (changed,) = store.register([(URL, "etag-2")])
    assert (changed.status, changed.change) == (Status.PENDING, Change.CHANGED)
    row = store.get(URL)
    assert row is not None
    assert (row.generation, row.error_message) == (2, None)
