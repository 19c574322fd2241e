"""Celery settings for pipeline's app; each says why it is set.

The PIPELINE_* variables they come from are described in pipeline/settings.py.
"""

from __future__ import annotations

from pipeline import settings

broker_url = settings.BROKER_URL.get() or settings.DEFAULT_BROKER
result_backend = settings.RESULT_BACKEND.get()
# Without a backend there is nothing to store; Flower still shows results from task events.
task_ignore_result = result_backend is None

# Modules holding tasks: pipeline's own (the beat tasks: the sweep and watch scans; the
# reference task), then the user's (PIPELINE_TASK_MODULES).
include = [
    "pipeline.worker.tasks",
    "pipeline.sources.beat",
    "pipeline.reference.task",
    *settings.TASK_MODULES.get(),
]

task_default_queue = settings.QUEUE.get()

# JSON only: a pickled message could run arbitrary code in the worker, so it is refused.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]

# Ack after the task ran, so a message whose worker died is delivered again...
task_acks_late = True
# ...including when only the pool child died (Celery acks those unless told otherwise).
# The checkpoint's lease, not Celery's retry counter, decides whether the file gets another
# attempt, so 5.7's task_retry_on_worker_lost (a second counter, off by default) stays off.
task_reject_on_worker_lost = True
# How long the pool waits for a result a dead child may have sent before declaring it lost
# (10 s by default). The outcome that matters is in Postgres: a child that committed before
# dying leaves a completed row, which the redelivered task skips; so 1 s is safe, and it lets
# pipeline release the file (CheckpointRequest) about as soon as the child is gone.
worker_lost_wait = 1.0
# One message reserved per pool process: fewer files wait behind a busy or dying process, and a
# SIGKILLed worker takes fewer messages down with it.
worker_prefetch_multiplier = 1
# A broker hiccup must not cancel running tasks: the claim already fences the redelivered copy,
# and a cancelled task would spend one of the file's attempts for nothing.
worker_cancel_long_running_tasks_on_connection_loss = False
broker_connection_retry_on_startup = True

broker_transport_options = {
    # Redis: an unacked message goes back to the queue after this long, whether or not its
    # worker is alive. It is not how pipeline recovers a file (the lease and the sweep do, on
    # the database clock), so it is set beyond the longest backoff (300 s) and any file's
    # run: a long file or a scheduled retry is never copied while its worker lives. Kept an
    # hour, Celery's default; the copy of a dead worker's message is harmless (one claim).
    "visibility_timeout": 3600,
    # kombu looks for such messages every interval x throttle seconds (10 x 10 by default).
    "unacked_restore_interval": 10,
    "unacked_restore_throttle": 10,
}

# Events for Flower: received (with the arguments), started, retried, succeeded, failed.
worker_send_task_events = True
task_track_started = True
# No task-sent event: it is a second Redis round trip per enqueue (half of submit's broker
# cost, measured), and Flower gets the file URL from the worker's task-received event.
task_send_sent_event = False

# The sweep runs inside every worker (pipeline.worker.hooks.Sweeper); beat may still send
# `pipeline.reap` for those who run it (it then waits in the queue like any task).
beat_schedule = {
    "pipeline-reap": {
        "task": "pipeline.reap",
        "schedule": settings.REAP_INTERVAL.get(),
        # The task runs on whichever worker takes it, so PIPELINE_REAP_WAITING_SECONDS set for
        # beat travels with the message; unset, each worker's own setting (or 120 s) applies.
        "kwargs": (
            {"waiting_seconds": settings.REAP_WAITING_SECONDS.get()}
            if settings.REAP_WAITING_SECONDS.is_set()
            else {}
        ),
    }
}

# Patterns `celery beat` watches: one `pipeline.watch_scan` entry each, added when beat starts,
# which refuses a malformed value there with its reason. Entries `PATTERN EVERY [batch=NAME]
# [task=NAME]`, separated by ";" (pipeline/sources/watchspec.py); a config module of your own
# may set a list of such strings, or of dicts, instead.
pipeline_watch = settings.WATCH.get()
