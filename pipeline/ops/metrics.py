"""Prometheus metrics of the checkpoint table, for alerts Flower cannot give, and of watches.

The table is read by a background refresh every `interval` seconds, not per scrape: a scrape
only serves the last snapshot, so any number of scrapers costs the database nothing more.
Everything comes from the database, so it survives any restart of workers or exporter. What
happened recently is counted over a window (`pipeline_window_*`, 15 minutes by default) from
indexed timestamps rather than as counters over the whole history: a count of every attempt
ever made would read the whole history on every refresh, and would go down when old rows are
deleted. Labels stay bounded: no file URL; batches only for the `max_batches` most active;
error classes beyond the most frequent `MAX_ERROR_CLASSES` counted as "other".
The README's metrics table (docs/operations.md) lists each one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from pipeline import errors, masking
from pipeline.models import Status
from pipeline.store import Reports
from pipeline.views import Histogram, Operations

if TYPE_CHECKING:
    from pipeline.sources.watch import ScanReport as WatchReport

logger = logging.getLogger("pipeline.metrics")

DEFAULT_WINDOW = 900.0
DEFAULT_MAX_BATCHES = 20
# Error classes are the users' exception class names: bounded in practice, but a task that
# makes classes on the fly must not make a series per error.
MAX_ERROR_CLASSES = 10
OUTCOMES = ("completed", "failed", "lost")


class CheckpointCollector(Collector):
    """Serves the latest snapshot of the checkpoint table; `refresh()` takes a new one."""

    def __init__(
        self,
        store: Reports,
        *,
        window: float = DEFAULT_WINDOW,
        max_batches: int = DEFAULT_MAX_BATCHES,
    ) -> None:
        self.store = store
        self.window = window
        self.max_batches = max_batches
        self._lock = threading.Lock()
        self._snapshot: Operations | None = None
        self._refreshed_at = 0.0
        self._refresh_seconds = 0.0
        self._up = 0
        self._refused: str | None = None  # the cause of the last failed refresh

    def refresh(self) -> None:
        started = time.monotonic()
        try:
            snapshot = self.store.operations(
                window_seconds=self.window, max_batches=self.max_batches
            )
        except Exception as error:
            # Any error, not only the store's own: one escaping here would end the refresh
            # thread, and the last snapshot would be served as current (with up = 1) forever.
            # Scrubbed, without the traceback at warning level: a driver's message or a
            # frame's text may quote the database URL, password and all.
            message = masking.scrub(
                f"{type(error).__name__}: {error}", getattr(self.store, "url", None)
            )
            logger.warning("metrics refresh failed: %s", message)
            if not isinstance(error, errors.PipelineError):
                logger.debug("metrics refresh traceback", exc_info=True)
            with self._lock:
                self._up = 0
                cause = getattr(error, "cause", None)
                self._refused = cause if isinstance(cause, str) else None
            return
        with self._lock:
            self._refused = None
            self._snapshot = snapshot
            self._refreshed_at = time.time()
            self._refresh_seconds = time.monotonic() - started
            self._up = 1

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            s, up, refused = self._snapshot, self._up, self._refused
            refreshed_at, took = self._refreshed_at, self._refresh_seconds
        yield gauge("pipeline_up", "1 when the last refresh of the checkpoint table worked", up)
        if refused is not None:
            family = GaugeMetricFamily(
                "pipeline_database_refused",
                "1 with the cause (disk full, too many connections, unreachable, configuration,"
                " ...) when the last refresh was refused by the database",
                labels=["cause"],
            )
            family.add_metric([refused], 1)
            yield family
        yield gauge(
            "pipeline_snapshot_timestamp_seconds",
            "When the served figures were read from the database (Unix time)",
            refreshed_at,
        )
        yield gauge("pipeline_snapshot_duration_seconds", "How long the last refresh took", took)
        if s is None:
            return  # no figures rather than made-up zeros
        yield from files(s)
        yield from ages(s)
        yield from window(s)
        yield from batches(s, refreshed_at)
        yield gauge(
            "pipeline_workers_live",
            "Worker main processes whose heartbeat is at most 3 intervals old",
            s.workers_live,
        )
        if s.database_trouble_at:
            family = GaugeMetricFamily(
                "pipeline_database_trouble_timestamp_seconds",
                "When the workers last saw each cause of database trouble (last day)",
                labels=["cause"],
            )
            for cause, at in sorted(s.database_trouble_at.items()):
                family.add_metric([cause], at)
            yield family
        if s.worker_heartbeat_age is not None:
            yield gauge(
                "pipeline_worker_heartbeat_age_seconds",
                "Time since any worker's latest heartbeat (absent: no worker ever seen)",
                s.worker_heartbeat_age,
            )


def gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def files(s: Operations) -> Iterator[Metric]:
    family = GaugeMetricFamily("pipeline_files", "Files by status", labels=["status"])
    for status in Status:
        family.add_metric([str(status)], s.counts.get(status, 0))
    yield family


def ages(s: Operations) -> Iterator[Metric]:
    for name, help_text, value in (
        (
            "pipeline_oldest_pending_age_seconds",
            "Age of the oldest pending file, since its submit (0: none pending)",
            s.oldest_pending_age,
        ),
        (
            "pipeline_oldest_failed_age_seconds",
            "Time since the oldest failed file (awaiting its retry) failed (0: none)",
            s.oldest_failed_age,
        ),
        (
            "pipeline_oldest_live_lease_age_seconds",
            "Running time of the oldest claim whose lease is live (a stuck file shows here)",
            s.oldest_live_lease_age,
        ),
        (
            "pipeline_oldest_expired_lease_age_seconds",
            "How long the oldest expired lease has waited for the sweep (0: none)",
            s.oldest_expired_lease_age,
        ),
    ):
        yield gauge(name, help_text, value or 0.0)
    yield gauge(
        "pipeline_expired_leases",
        "Claims whose lease expired, waiting for the sweep",
        s.expired_leases,
    )
    yield gauge(
        "pipeline_completions_per_second",
        "Files completed per second over the last minute (a stalled batch shows 0)",
        s.completed_last_minute / 60.0,
    )


def window(s: Operations) -> Iterator[Metric]:
    yield gauge(
        "pipeline_window_seconds",
        "Length of the window the pipeline_window_* figures count over",
        s.window_seconds,
    )
    yield gauge(
        "pipeline_window_completed_files", "Files completed in the window", s.window_completed
    )
    yield gauge("pipeline_window_dead_files", "Files that ended dead in the window", s.window_dead)
    yield gauge(
        "pipeline_window_records_committed",
        "Records persisted by the files completed in the window",
        s.window_records_committed,
    )
    yield gauge(
        "pipeline_records_in_flight",
        "Records committed so far by the chunks of the files still running",
        s.records_in_flight,
    )
    attempts = GaugeMetricFamily(
        "pipeline_window_attempts",
        "Attempts that ended in the window, by outcome and error class",
        labels=["outcome", "error_class"],
    )
    for (outcome, error_class), n in bounded_classes(s.window_attempts).items():
        attempts.add_metric([outcome, error_class], n)
    for outcome in OUTCOMES:  # every outcome present, so a rate of 0 reads as 0
        if not any(o == outcome for o, _ in s.window_attempts):
            attempts.add_metric([outcome, ""], 0)
    yield attempts
    run = GaugeHistogramMetricFamily(
        "pipeline_window_run_seconds",
        "Run time of the attempts that ended in the window, by outcome",
        labels=["outcome"],
    )
    for outcome in OUTCOMES:
        histogram = s.window_run_seconds.get(outcome)
        if histogram is not None:
            run.add_metric([outcome], buckets(histogram), histogram.total_seconds)
    yield run
    pickup = GaugeHistogramMetricFamily(
        "pipeline_window_pickup_latency_seconds",
        "Submit to first claim, of the files first claimed in the window",
    )
    pickup.add_metric([], buckets(s.window_pickup_seconds), s.window_pickup_seconds.total_seconds)
    yield pickup


def bounded_classes(attempts: Mapping[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    """The attempts by (outcome, class), classes past the MAX_ERROR_CLASSES most frequent
    counted as "other"."""
    by_class: dict[str, int] = {}
    for (_, error_class), n in attempts.items():
        by_class[error_class] = by_class.get(error_class, 0) + n
    kept = {
        c for c, _ in sorted(by_class.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_ERROR_CLASSES]
    }
    result: dict[tuple[str, str], int] = {}
    for (outcome, error_class), n in attempts.items():
        key = (outcome, error_class if error_class in kept or not error_class else "other")
        result[key] = result.get(key, 0) + n
    return result


def buckets(histogram: Histogram) -> list[tuple[str, float]]:
    pairs = [
        (repr(float(b)), float(n))
        for b, n in zip(histogram.bounds, histogram.cumulative, strict=True)
    ]
    return [*pairs, ("+Inf", float(histogram.count))]


def batches(s: Operations, now: float) -> Iterator[Metric]:
    yield gauge(
        "pipeline_active_batches",
        "Batches with a file not yet terminal or finished in the window (the per-batch "
        "metrics show the most active of them)",
        s.active_batches,
    )
    counts = GaugeMetricFamily(
        "pipeline_batch_files", "Files of an active batch by status", labels=["batch", "status"]
    )
    eta = GaugeMetricFamily(
        "pipeline_batch_eta_seconds",
        "Time until every file of the batch is terminal at its pace in the window "
        "(absent: nothing finished in the window)",
        labels=["batch"],
    )
    end = GaugeMetricFamily(
        "pipeline_batch_estimated_end_timestamp_seconds",
        "When the batch will be done at its pace in the window (Unix time)",
        labels=["batch"],
    )
    for b in s.batches:
        for status in Status:
            counts.add_metric([b.batch_id, str(status)], b.counts.get(status, 0))
        left = b.eta_seconds
        if left is not None:
            eta.add_metric([b.batch_id], left)
            end.add_metric([b.batch_id], now + left)
    yield counts
    yield eta
    yield end


def serve(
    store: Reports,
    *,
    port: int,
    addr: str = "0.0.0.0",
    interval: float = 15.0,
    window: float = DEFAULT_WINDOW,
    max_batches: int = DEFAULT_MAX_BATCHES,
) -> tuple[CheckpointCollector, threading.Event]:
    """Start the HTTP server and the refresh thread; returns the collector and a stop event."""
    collector = CheckpointCollector(store, window=window, max_batches=max_batches)
    collector.refresh()
    registry = CollectorRegistry()
    registry.register(collector)
    start_http_server(port, addr=addr, registry=registry)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            collector.refresh()

    threading.Thread(target=loop, name="pipeline-metrics-refresh", daemon=True).start()
    return collector, stop


class WatchCollector(Collector):
    """A watch's scans: totals since it started and the figures of the last scan."""

    def __init__(self, pattern: str) -> None:
        self.pattern = masking.scrub(pattern)
        self._lock = threading.Lock()
        self._totals = {"scans": 0, "failed": 0, "new": 0, "changed": 0, "enqueued": 0}
        self._last: dict[str, float] = {"seen": 0, "seconds": 0.0, "list_seconds": 0.0, "at": 0}

    def observe(self, report: WatchReport) -> None:
        with self._lock:
            self._totals["scans"] += 1
            if not report.ok:
                self._totals["failed"] += 1
                return
            for key in ("new", "changed", "enqueued"):
                self._totals[key] += getattr(report, key)
            self._last = {
                "seen": report.seen,
                "seconds": report.seconds,
                "list_seconds": report.list_seconds,
                "at": time.time(),
            }

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        with self._lock:
            totals, last = dict(self._totals), dict(self._last)
        labels = ["pattern"]
        for key, help_text in (
            ("scans", "Scans started"),
            ("failed", "Scans skipped on a storage or database error"),
            ("new", "New files registered and enqueued"),
            ("changed", "Changed files (a new generation) enqueued"),
            ("enqueued", "Tasks sent"),
        ):
            name = "pipeline_watch_scans_failed" if key == "failed" else f"pipeline_watch_{key}"
            family = CounterMetricFamily(name, help_text, labels=labels)
            family.add_metric([self.pattern], totals[key])
            yield family
        for key, name, help_text in (
            ("seen", "pipeline_watch_files_seen", "Files listed by the last successful scan"),
            ("seconds", "pipeline_watch_scan_duration_seconds", "The last successful scan"),
            ("list_seconds", "pipeline_watch_listing_duration_seconds", "Its listing alone"),
            ("at", "pipeline_watch_last_scan_timestamp_seconds", "When it ended (Unix time)"),
        ):
            gauge = GaugeMetricFamily(name, help_text, labels=labels)
            gauge.add_metric([self.pattern], last[key])
            yield gauge


def serve_watch(pattern: str, *, port: int, addr: str = "0.0.0.0") -> WatchCollector:
    """Start the HTTP server of a watch's metrics; feed it with `observe(report)`."""
    collector = WatchCollector(pattern)
    registry = CollectorRegistry()
    registry.register(collector)
    start_http_server(port, addr=addr, registry=registry)
    return collector
