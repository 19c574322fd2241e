"""Settings from the environment, and how URLs are shown (never with their password)."""

from __future__ import annotations

import os

from pipeline import masking

DATABASE_URL_ENV = "PIPELINE_DATABASE_URL"
BROKER_URL_ENV = "PIPELINE_BROKER_URL"


def database_url() -> str | None:
    return os.environ.get(DATABASE_URL_ENV) or None


def broker_url() -> str | None:
    return os.environ.get(BROKER_URL_ENV) or None


def mask_url(url: str | None) -> str:
    """The URL with any password replaced by ***, safe to print or log (see masking)."""
    return masking.mask_url(url)
