"""What a batch's completion callback reads: the summary its row carries.

A callback is a checkpointed task like any other (`@checkpointed`), sent for the URL
`batch:NAME#N` once every file of batch NAME is completed or dead; `batch_summary(file_url)`
gives it the batch's counts and dead files with their errors, as they were when it settled.
"""

from __future__ import annotations

from typing import Any

from pipeline.worker import runtime


def batch_summary(file_url: str) -> dict[str, Any] | None:
    """The summary of the batch whose callback `file_url` is (None: not a callback URL):
    `batch`, `callback` (its number), `files`, `counts` by status, `dead` (file_url, error,
    attempts; the first 1,000)."""
    return runtime.get_store().callback_summary(file_url)
