"""The metrics exporter's warnings never quote a password, however it is spelled."""

from __future__ import annotations

import logging

import pytest

from pipeline import errors
from pipeline.ops.metrics import CheckpointCollector
from pipeline.store.postgres import PostgresStore


@pytest.mark.parametrize("password", ["S3cret#Pw", "a/b?c@dd", "p@ss:w0rd#x"])
def test_refresh_failure__warning_names_the_database_without_its_password(
    caplog: pytest.LogCaptureFixture, password: str
) -> None:
    url = f"postgresql://app:{password}@127.0.0.1:1/db"
    try:
        store = PostgresStore(url)
    except errors.InvalidInput as refused:  # SQLAlchemy cannot parse it: said so, masked
        text = str(refused)
    else:
        collector = CheckpointCollector(store)
        with caplog.at_level(logging.DEBUG, logger="pipeline.metrics"):
            collector.refresh()
        store.close()
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "metrics refresh failed" in text
        assert "unreachable" in text
    assert password not in text
    for piece in password.replace("#", " ").replace("/", " ").replace("@", " ").split():
        if len(piece) >= 3:
            assert piece not in text
