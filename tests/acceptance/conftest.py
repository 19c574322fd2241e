"""Acceptance tests: real `celery worker` and `celery beat` subprocesses, real signals."""

from __future__ import annotations

from tests.support.brokers import broker_url, rabbitmq_url
from tests.support.workers import cluster, make_cluster, pytest_runtest_makereport

__all__ = ["broker_url", "cluster", "make_cluster", "pytest_runtest_makereport", "rabbitmq_url"]
