"""Watching under `celery beat`: a scan entry per PIPELINE_WATCH pattern, and the scan task.

Included by the app's settings (pipeline/worker/celeryconfig.py), so the worker has the
task and beat has the schedule, while the worker side itself imports nothing of discovery.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import beat_init

from pipeline import errors, masking
from pipeline.sender import Sender
from pipeline.sources import producer, watch, watchspec
from pipeline.worker import runtime
from pipeline.worker.celery_app import app

logger = logging.getLogger("pipeline")


@app.task(name=watchspec.SCAN_TASK, ignore_result=True, acks_late=False)
def watch_scan(
    pattern: str,
    batch_id: str = watchspec.DEFAULT_BATCH,
    task_name: str = producer.DEFAULT_TASK,
    file_type: str = "events",
) -> dict[str, object]:
    """Beat task: one scan of a watched pattern (see pipeline.sources.watch); its report."""
    with Sender(app) as sender:
        report = watch.scan(
            runtime.get_store(),
            pattern,
            sender.send,
            task_name=task_name,
            batch_id=batch_id,
            file_type=file_type,
        )
    (logger.warning if report.error else logger.info)("%s", report.line())
    return report.as_dict()


@beat_init.connect
def _schedule_watches(sender: Any, **_: Any) -> None:
    """Add a scan entry per watched pattern (`pipeline_watch`, from PIPELINE_WATCH) to the
    schedule beat runs; a malformed setting stops beat at start, with its reason."""
    setting = sender.app.conf.get("pipeline_watch")
    try:
        specs = watchspec.parse(setting)
    except errors.InvalidInput as error:
        logger.critical("beat: %s", error)
        # SystemExit, not an Exception: Celery's signal dispatch logs and swallows those,
        # and beat would run on without the watches.
        raise SystemExit(2) from None
    if specs:
        sender.scheduler.update_from_dict(watchspec.beat_entries(specs))
    for spec in specs:
        logger.info("beat: watching %s", masking.scrub(spec.shown))
