"""Celery's conventional settings module, for `celery --config celeryconfig` users.

The settings live in pipeline/worker/celeryconfig.py so that they ship inside the installed package;
this file re-exports them for tools run from the source tree.
"""

from pipeline.worker.celeryconfig import *  # noqa: F403
