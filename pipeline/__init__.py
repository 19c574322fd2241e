"""Exactly-once file processing on Celery and PostgreSQL.

`from pipeline import app, checkpointed` gives the Celery app and the decorator; both load on
first use, so that commands which never touch Celery (`pipeline status`, `pipeline db`) do not
pay for importing it. `celery -A pipeline worker` finds `app` the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.errors import LostClaim, PipelineError, SchemaMissing, StoreUnavailable
from pipeline.models import Checkpoint, Claim, Reason, Refusal, Stats, Status
from pipeline.store import Store, open_store

if TYPE_CHECKING:
    from celery import Celery

    from pipeline.worker.callbacks import batch_summary as batch_summary
    from pipeline.worker.decorator import checkpointed as checkpointed

    app: Celery


def __getattr__(name: str) -> Any:
    if name == "app":
        from pipeline.worker.celery_app import app

        return app
    if name == "batch_summary":
        from pipeline.worker.callbacks import batch_summary

        return batch_summary
    if name == "checkpointed":
        from pipeline.worker.decorator import checkpointed

        return checkpointed
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = [
    "Checkpoint",
    "Claim",
    "LostClaim",
    "PipelineError",
    "Reason",
    "Refusal",
    "SchemaMissing",
    "Stats",
    "Status",
    "Store",
    "StoreUnavailable",
    "app",
    "batch_summary",
    "checkpointed",
    "open_store",
]
