"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.store.postgres import PostgresStore
from pipeline.worker import runtime


@pytest.fixture
def reference_store(pg_store: PostgresStore) -> Iterator[PostgresStore]:
    """The test store as the reference task's store (the one `runtime` hands to a task run in
    this process), on empty checkpoint and events tables."""
    pg_store.execute_script("TRUNCATE events")
    previous = runtime._store
    runtime.set_store(pg_store)
    yield pg_store
    runtime.set_store(previous)
