"""The exporter's label bounds and bucket arithmetic, without a database."""

from __future__ import annotations

from types import SimpleNamespace

from pipeline.ops import metrics
from pipeline.store.postgres.operations import histogram


def test_error_classes__past_the_most_frequent_ones_count_as_other() -> None:
    attempts = {("failed", f"E{i:02d}"): 100 - i for i in range(15)}
    attempts[("completed", "")] = 7
    attempts[("lost", "WorkerLost")] = 500
    bounded = metrics.bounded_classes(attempts)
    classes = {c for _, c in bounded}
    assert len(classes - {"", "other"}) == metrics.MAX_ERROR_CLASSES
    assert {"WorkerLost", "E00"} <= classes  # the most frequent stay by name
    assert "E14" not in classes  # the rarest are folded
    assert sum(bounded.values()) == sum(attempts.values())  # nothing dropped
    assert bounded[("completed", "")] == 7  # no class is not "other"


def test_histogram__width_bucket_numbers_become_cumulative_prometheus_buckets() -> None:
    bounds = (1.0, 10.0)
    rows = [
        SimpleNamespace(bucket=0, n=2, seconds=1.0),  # below 1 s
        SimpleNamespace(bucket=1, n=3, seconds=12.0),  # 1 s to 10 s
        SimpleNamespace(bucket=2, n=1, seconds=40.0),  # 10 s and more
    ]
    h = histogram(rows, bounds)
    assert h.cumulative == (2, 5)
    assert h.count == 6
    assert h.total_seconds == 53.0
    assert metrics.buckets(h) == [("1.0", 2.0), ("10.0", 5.0), ("+Inf", 6.0)]
