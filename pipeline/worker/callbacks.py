"""A batch's completion callback: what it reads (the summary its row carries), and how the
worker whose ending made the batch terminal sends it at once (the same for the next held file
of a limited batch, which an ending of one of its files releases).

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


def send(task: Any, follow_up: Work | None) -> None:
    """Send (by `task`'s app) what an ending asked for, after its transaction committed: the
    callback a completion or a dead ending created, or the held file of a limited batch it
    released. Never the file's failure: a message not sent (the broker away, this process
    killed before it got here) leaves that row pending, and the sweep hands it back after
    PIPELINE_REAP_WAITING_SECONDS; a duplicate message is refused by its claim."""
    if follow_up is None or follow_up.task_name is None:
        return
    try:
        with Sender(task.app) as sender:
            sender.send(follow_up.task_name, follow_up.file_url)
    except Exception as error:
        logger.warning("%s not sent (the sweep sends it): %s", follow_up.file_url, error)
        return
    logger.info("%s sent", follow_up.file_url)
