"""Two watches of one prefix scanning at the same moment, each with its own connections:
every file is enqueued by exactly one of them (the row is created by one statement)."""

from __future__ import annotations

import pathlib
import threading
import time
from collections import Counter

from pipeline.sources import urls, watch
from pipeline.store.postgres import PostgresStore

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
    spans: list[list[tuple[float, float]]] = [[], []]  # (start, end) of each scan

    def watcher(i: int) -> None:
        for _ in range(ROUNDS):
            barrier.wait()  # the files of this round are written
            started = time.monotonic()
            reports[i].append(
                watch.scan(
                    stores[i],
                    f"{tmp_path}/*.jsonl",
                    lambda task, url: sent[i].append(url),
                    batch_id="race",
                )
            )
            spans[i].append((started, time.monotonic()))
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
    # The scans ran side by side, not one after the other. (Which of them wins a chunk's rows
    # is the scheduler's choice: one may win them all, seen under load.)
    overlapping = [max(a[0], b[0]) < min(a[1], b[1]) for a, b in zip(*spans, strict=True)]
    assert all(overlapping), spans
