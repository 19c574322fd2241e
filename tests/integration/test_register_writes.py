"""`register` on Postgres: a URL already known costs a read, never a write or a row lock.

A watch registers every listed object on every scan; at 100,000 known objects a statement
that locked (ON CONFLICT DO UPDATE locks conflicting rows even when its WHERE is false) or
rewrote them would write WAL for the whole prefix each time.
"""

from __future__ import annotations

import threading

import sqlalchemy as sa

from pipeline.models import Change
from pipeline.store.postgres import PostgresStore

URLS = [f"file:///known/{i:04d}.jsonl" for i in range(300)]


def _xmax(store: PostgresStore) -> set[str]:
    """The xmax of every row: 0 unless a transaction updated, deleted or locked the row."""
    with store.transaction() as tx:
        rows = tx.connection.execute(
            sa.text("SELECT DISTINCT xmax::text FROM file_checkpoints WHERE file_url LIKE :p"),
            {"p": "file:///known/%"},
        )
        return {r[0] for r in rows}


def test_register__unchanged_urls_are_neither_written_nor_locked(pg_store: PostgresStore) -> None:
    pg_store.register([(u, "etag-1") for u in URLS])
    assert _xmax(pg_store) == {"0"}
    again = pg_store.register([(u, "etag-1") for u in URLS])
    assert {r.change for r in again} == {Change.UNCHANGED}
    assert _xmax(pg_store) == {"0"}


def test_register__two_sessions_registering_the_same_urls_at_once_create_each_row_once(
    pg_store: PostgresStore, database_url: str
) -> None:
    """The second session waits on the first's new rows and reports them unchanged."""
    stores = [PostgresStore(database_url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    results: list[list[str]] = [[] for _ in stores]

    def register(i: int) -> None:
        barrier.wait()
        for start in range(0, len(URLS), 100):
            regs = stores[i].register([(u, "etag-1") for u in URLS[start : start + 100]])
            results[i] += [r.file_url for r in regs if r.change is Change.NEW]

    threads = [threading.Thread(target=register, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for s in stores:
        s.close()
    created = sorted(u for r in results for u in r)
    assert created == URLS
