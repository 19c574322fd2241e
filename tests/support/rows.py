"""Moving a checkpoint row's clock on PostgreSQL, for tests: one UPDATE on the database's
clock, so the next claim or sweep sees what it would see after the time had passed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class SupportsScalar(Protocol):
    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any: ...


_EXPIRE_SQL = (
    "UPDATE file_checkpoints SET lease_expires_at = now() - interval '1 second'"
    " WHERE file_url = :file_url AND status = 'processing' RETURNING file_url"
)

_BACKDATE_SQL = (
    "UPDATE file_checkpoints SET retry_at = clock_timestamp() - make_interval(secs => :s)"
    " WHERE file_url = :file_url AND status = 'failed' AND retry_at IS NOT NULL"
    " RETURNING file_url"
)


def expire_lease(store: SupportsScalar, file_url: str) -> bool:
    """Put a live claim's lease in the past, as after its worker's crash; False when the file
    has no claim."""
    return store.scalar(_EXPIRE_SQL, {"file_url": file_url}) is not None


def backdate_retry(store: SupportsScalar, file_url: str, seconds: float) -> bool:
    """Put a failed row's retry time `seconds` in the past (as if its backoff had run out that
    long ago); False when it has no retry time."""
    return store.scalar(_BACKDATE_SQL, {"file_url": file_url, "s": seconds}) is not None
