"""Two watches of one prefix scanning at the same moment, each with its own connections:
every file is enqueued by exactly one of them (the row is created by one statement)."""

from __future__ import annotations

import pathlib
import threading
from collections import Counter

from pipeline import urls, watch
from pipeline.sqlstore import PostgresStore

ROUNDS = 4
PER_ROUND = 1200  # two register statements per scan, the second one partly full


def test_race__two_watches_scanning_together_enqueue_each_file_once(
    pg_store: PostgresStore, database_url: str, tmp_path: pathlib.Path
) -> None:
    stores = [PostgresStore(database_url) for _ in range(2)]
    sent: list[list[str]] = [[], []]
    reports: list[list[watch.ScanReport]] = [[], []]
    barrier = threading.Barrier(3, timeout=30)  # the two watches and the file writer
    made: list[str] = []

    def watcher(i: int) -> None:
        for _ in range(ROUNDS):
            barrier.wait()  # the files of this round are written
            reports[i].append(
                watch.scan(
                    stores[i],
                    f"{tmp_path}/*.jsonl",
                    lambda task, url: sent[i].append(url),
                    batch_id="race",
                )
            )
            barrier.wait()  # both scans of this round are done

    threads = [threading.Thread(target=watcher, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        for r in range(ROUNDS):
            for n in range(PER_ROUND):
                path = tmp_path / f"{r}-{n:05d}.jsonl"
                path.write_text("{}\n")
                made.append(urls.normalize(str(path)))
            barrier.wait()
            barrier.wait()
    finally:
        for t in threads:
            t.join(timeout=60)
        for s in stores:
            s.close()
    assert all(r.ok for rs in reports for r in rs), reports
    counts = Counter(sent[0] + sent[1])
    assert sorted(counts) == sorted(made)
    assert set(counts.values()) == {1}
    assert sum(r.new for rs in reports for r in rs) == len(made)
    # Both really found new files: the scans ran side by side, not one after the other.
    assert sent[0], len(sent[1])
    assert sent[1], len(sent[0])
