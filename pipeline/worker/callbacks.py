"""A batch's completion callback: what it reads (the summary its row carries), and how the
worker whose ending made the batch terminal sends it at once.

A callback is a checkpointed task like any other (`@checkpointed`), sent for the URL
`batch:NAME#N` once every file of batch NAME is completed or dead; `batch_summary(file_url)`
gives it the batch's counts and dead files with their errors, as they were when it settled.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.models import Work
from pipeline.sender import Sender
from pipeline.worker import runtime

logger = logging.getLogger("pipeline")


def batch_summary(file_url: str) -> dict[str, Any] | None:
    """The summary of the batch whose callback `file_url` is (None: not a callback URL):
    `batch`, `callback` (its number), `files`, `counts` by status, `dead` (file_url, error,
    attempts; the first 1,000)."""
    return runtime.get_store().callback_summary(file_url)


def send(task: Any, callback: Work | None) -> None:
    """Send (by `task`'s app) the callback a completion or a dead ending created, after its
    transaction committed. Never the file's failure: a message not sent (the broker away, this
    process killed before it got here) leaves the callback row pending, and the sweep hands it
    back after PIPELINE_REAP_WAITING_SECONDS; a duplicate message is refused by its claim."""
    if callback is None or callback.task_name is None:
        return
    try:
        with Sender(task.app) as sender:
            sender.send(callback.task_name, callback.file_url)
    except Exception as error:
        logger.warning("callback %s not sent (the sweep sends it): %s", callback.file_url, error)
        return
    logger.info("callback %s sent", callback.file_url)
