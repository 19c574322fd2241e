"""The Celery app: its settings and the steps pipeline adds to every worker."""

from __future__ import annotations

from celery import Celery

from pipeline.worker import hooks, messages

app = Celery("pipeline")
app.config_from_object("pipeline.worker.celeryconfig")

app.steps["worker"].add(hooks.PoolMaintenance)  # a dead pool process noticed in half a second
app.steps["worker"].add(hooks.Sweeper)  # the sweep in every worker, without beat
app.steps["consumer"].add(messages.MessageGuard)  # a malformed message is rejected, not fatal
