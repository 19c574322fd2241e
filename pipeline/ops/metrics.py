"""Prometheus metrics of the checkpoint table, for alerts Flower cannot give, and of watches.

The table is read by a background refresh every `interval` seconds, not per scrape: a scrape
only serves the last snapshot, so any number of scrapers costs the database nothing more.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from pipeline import errors, masking
from pipeline.models import Overview, Status
from pipeline.store import Reports

if TYPE_CHECKING:
    from pipeline.sources.watch import ScanReport as WatchReport

logger = logging.getLogger("pipeline.metrics")


class CheckpointCollector(Collector):
    """Serves the latest snapshot of the checkpoint table; `refresh()` takes a new one."""

    def __init__(self, store: Reports) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._overview: Overview | None = None
        self._attempts: dict[str, int] = {}
        self._refreshed_at = 0.0
        self._refresh_seconds = 0.0
        self._up = 0

    def refresh(self) -> None:
        started = time.monotonic()
        try:
            overview = self.store.overview(dead_limit=0)
            attempts = self.store.attempt_outcomes()
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
            return
        with self._lock:
            self._overview, self._attempts = overview, attempts
            self._refreshed_at = time.time()
            self._refresh_seconds = time.monotonic() - started
            self._up = 1

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            overview, attempts, up = self._overview, dict(self._attempts), self._up
            refreshed_at, took = self._refreshed_at, self._refresh_seconds
        yield GaugeMetricFamily(
            "pipeline_up", "1 when the last refresh of the checkpoint table worked", value=up
        )
        yield GaugeMetricFamily(
            "pipeline_snapshot_timestamp_seconds",
            "When the served figures were read from the database (Unix time)",
            value=refreshed_at,
        )
        yield GaugeMetricFamily(
            "pipeline_snapshot_duration_seconds", "How long the last refresh took", value=took
        )
        if overview is None:
            return
        files = GaugeMetricFamily(
            "pipeline_files", "Files by batch and status", labels=["batch", "status"]
        )
        for batch, counts in overview.counts.items():
            for status in Status:
                files.add_metric([batch or "", str(status)], counts.get(status, 0))
        yield files
        totals = overview.totals()
        yield GaugeMetricFamily(
            "pipeline_dead_files",
            "Files that ended dead (alert on increase)",
            value=totals[Status.DEAD],
        )
        outcomes = GaugeMetricFamily(
            "pipeline_attempts", "Executions started, by outcome", labels=["outcome"]
        )
        for outcome in ("running", "completed", "failed", "lost"):
            outcomes.add_metric([outcome], attempts.get(outcome, 0))
        yield outcomes
        yield GaugeMetricFamily(
            "pipeline_oldest_live_lease_age_seconds",
            "Age of the oldest claim whose lease is live (a stuck file shows here)",
            value=overview.oldest_live_lease_age or 0.0,
        )
        yield GaugeMetricFamily(
            "pipeline_expired_leases",
            "Claims whose lease expired, waiting for the reaper (alert when it stays above 0)",
            value=overview.expired_leases,
        )
        yield GaugeMetricFamily(
            "pipeline_completions_per_second",
            "Files completed per second over the last minute (a stalled batch shows 0)",
            value=overview.completed_last_minute / 60.0,
        )


def serve(
    store: Reports, *, port: int, addr: str = "0.0.0.0", interval: float = 15.0
) -> tuple[CheckpointCollector, threading.Event]:
    """Start the HTTP server and the refresh thread; returns the collector and a stop event."""
    collector = CheckpointCollector(store)
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
