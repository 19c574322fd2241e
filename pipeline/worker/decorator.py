"""`@checkpointed`: a plain function of a file URL becomes a crash-safe Celery task."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from celery import Task

from pipeline import errors, tracing
from pipeline.store import DEFAULT_LEASE_SECONDS, DEFAULT_MAX_ATTEMPTS
from pipeline.worker import execution
from pipeline.worker.celery_app import app as default_app
from pipeline.worker.hooks import CheckpointRequest
from pipeline.worker.options import DEFAULT_SOFT_TIME_LIMIT, HARD_LIMIT_GRACE, Backoff, Spec


def checkpointed(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    app: Any = None,
    file_type: str = "unknown",
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    dont_retry_on: tuple[type[BaseException], ...] = (),
    backoff: float | Backoff = 2.0,
    backoff_max: float = 300.0,
    soft_time_limit: float | None = DEFAULT_SOFT_TIME_LIMIT,
    time_limit: float | None = None,
    **task_options: Any,
) -> Any:
    """Turn `fn(file_url, ..., *, checkpoint=None)` into a checkpointed Celery task.

    `soft_time_limit` (an hour by default; None: none): past it the function gets
    SoftTimeLimitExceeded and the attempt fails ("time limit"), retried like any failure.
    `time_limit` (default: the soft limit plus a minute): past it the pool kills the process
    and the attempt is recorded lost.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")

    def wrap(func: Callable[..., Any]) -> Any:
        target = app or default_app
        spec = Spec(
            file_type=file_type,
            max_attempts=max_attempts,
            lease_seconds=float(lease_seconds),
            retry_on=tuple(retry_on),
            dont_retry_on=tuple(dont_retry_on),
            backoff=backoff if isinstance(backoff, Backoff) else Backoff(backoff, backoff_max),
            wants_checkpoint="checkpoint" in inspect.signature(func).parameters,
        )
        options = {
            # The crash-safe options (see pipeline/worker/celeryconfig.py for why each).
            "acks_late": True,
            "reject_on_worker_lost": True,
            "serializer": "json",
            "max_retries": None,
            "Request": CheckpointRequest,
            # A database refusing the configuration fails the task at once: an expected error
            # (one line in the log, no traceback per task); trouble.log says it once a minute.
            "throws": (errors.StoreMisconfigured,),
            "soft_time_limit": soft_time_limit,
            "time_limit": (
                time_limit
                if time_limit is not None or soft_time_limit is None
                else soft_time_limit + HARD_LIMIT_GRACE
            ),
            **task_options,
        }

        traced = tracing.function(func)  # the user's function, a span when tracing is on

        @functools.wraps(func)
        def body(self: Task, file_url: str, *args: Any, **kwargs: Any) -> Any:
            return tracing.deliver(
                self, file_url, lambda: execution.run(self, traced, spec, file_url, args, kwargs)
            )

        task = target.task(
            name=name or f"{func.__module__}.{func.__qualname__}", bind=True, **options
        )(body)
        task.checkpoint_spec = spec
        return task

    return wrap(fn) if fn is not None else wrap
