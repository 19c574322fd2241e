"""pipeline's own beat task: `pipeline.reap`, the sweep sent by `celery beat`."""

from __future__ import annotations

import logging

from pipeline import errors
from pipeline.worker import runtime, sweep
from pipeline.worker.celery_app import app

logger = logging.getLogger("pipeline")


@app.task(name="pipeline.reap", ignore_result=True, acks_late=False)
def reap(waiting_seconds: float | None = None) -> dict[str, int]:
    """Beat task: the safety net for files whose message was acked or lost."""
    try:
        return sweep.reap_once(runtime.get_store(), app, waiting_seconds=waiting_seconds)
    except errors.StoreUnavailable as error:
        # Next beat tick tries again; nothing was changed.
        logger.warning("reaper skipped: %s", error)
        return {"reaped": 0, "enqueued": 0, "dead": 0, "queued": 0}
