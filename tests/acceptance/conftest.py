"""Acceptance tests: real `celery worker` and `celery beat` subprocesses, real signals."""

from __future__ import annotations

from tests.support.workers import cluster, make_cluster, pytest_runtest_makereport

__all__ = ["cluster", "make_cluster", "pytest_runtest_makereport"]
