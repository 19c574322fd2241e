"""Settings from the environment, and how URLs are shown (never with their password)."""

from __future__ import annotations

import os
import urllib.parse

DATABASE_URL_ENV = "PIPELINE_DATABASE_URL"
BROKER_URL_ENV = "PIPELINE_BROKER_URL"


def database_url() -> str | None:
    return os.environ.get(DATABASE_URL_ENV) or None


def broker_url() -> str | None:
    return os.environ.get(BROKER_URL_ENV) or None


def mask_url(url: str | None) -> str:
    """The URL with any password replaced by ***, safe to print or log."""
    if not url:
        return "(not set)"
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "(unparseable URL)"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
