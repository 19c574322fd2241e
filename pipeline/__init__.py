"""Exactly-once file processing on Celery and PostgreSQL."""

from __future__ import annotations

from pipeline.errors import LostClaim, PipelineError, SchemaMissing, StoreUnavailable
from pipeline.models import Checkpoint, Claim, Reason, Refusal, Stats, Status
from pipeline.store.postgres import PostgresStore


def open_store(database_url: str | None = None) -> PostgresStore:
    """The checkpoint store on the given Postgres URL (default: PIPELINE_DATABASE_URL)."""
    from pipeline import config

    url = database_url or config.database_url()
    if not url:
        raise PipelineError(f"no database URL given and {config.DATABASE_URL_ENV} is not set")
    return PostgresStore(url)


from pipeline.worker.celery_app import app  # noqa: E402
from pipeline.worker.decorator import checkpointed  # noqa: E402

__all__ = [
    "Checkpoint",
    "Claim",
    "LostClaim",
    "PipelineError",
    "PostgresStore",
    "Reason",
    "Refusal",
    "SchemaMissing",
    "Stats",
    "Status",
    "StoreUnavailable",
    "app",
    "checkpointed",
    "open_store",
]
