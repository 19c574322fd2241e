"""Workers survive any message: one the worker cannot unpack is rejected and logged, not fatal.

Celery's consumer hands each message to `on_task_received`, which handles a few malformed
shapes itself (headers that are not a mapping, an unknown task name, undecodable or
disallowed content) but lets anything else escape: a protocol-2 body that is not the
`[args, kwargs, embed]` triple, a missing `id` header, an unhashable task name, a bad `eta`.
An exception there ends the worker ("Unrecoverable error") and leaves the message in the
queue, so every worker started afterwards dies on it too.

`MessageGuard` (a consumer bootstep) wraps that handler: a message whose shape is wrong is
rejected (requeue=False: dropped on Redis, dead-lettered on RabbitMQ when the queue has a
dead-letter exchange) and logged with its id and the reason, before Celery sees it; any other
exception escaping Celery's handler for one message is treated the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from celery import bootsteps, signals

logger = logging.getLogger("pipeline.messages")

Handler = Callable[[Any], Any]


def problem(message: Any) -> str | None:
    """Why a protocol-2 task message cannot be run, or None (other shapes are Celery's)."""
    headers = message.headers
    if not isinstance(headers, Mapping) or "task" not in headers:
        return None  # not protocol 2: Celery's own handling (unknown format, protocol 1)
    task, task_id = headers.get("task"), headers.get("id")
    if not isinstance(task, str) or not task:
        return f"header 'task' is {_kind(task)}, not a task name"
    if not isinstance(task_id, str) or not task_id:
        return f"header 'id' is {_kind(task_id)}, not a task id"
    for name in ("eta", "expires"):
        value = headers.get(name)
        if value is not None and not isinstance(value, str | int | float):
            return f"header {name!r} is {_kind(value)}"
    limits = headers.get("timelimit")
    if limits is not None and not _time_limits_ok(limits):
        return f"header 'timelimit' is {_kind(limits)}, not [soft, hard]"
    try:
        body = message.payload
    except Exception:
        return None  # undecodable or disallowed content: Celery rejects it with its reason
    if isinstance(body, Mapping) and "args" in body:
        return None  # a protocol-1 body under protocol-2 headers: Celery converts it
    if not isinstance(body, list | tuple) or len(body) != 3:
        return f"body is {_kind(body)}, not the [args, kwargs, embed] list of protocol 2"
    args, kwargs, embed = body
    if not isinstance(args, list | tuple):
        return f"args is {_kind(args)}, not a list"
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        return f"kwargs is {_kind(kwargs)}, not a mapping of names"
    if embed is not None and not isinstance(embed, Mapping):
        return f"embed is {_kind(embed)}, not a mapping"
    return None


def guard(consumer: Any, handler: Handler) -> Handler:
    """`handler` (Celery's on_task_received) made safe against any one message."""
    connection_errors = tuple(getattr(consumer, "connection_errors", ()) or ())

    def on_task_received(message: Any) -> Any:
        try:
            reason = problem(message)
        except Exception as error:  # the check itself must never be what kills the worker
            reason = f"unreadable message ({type(error).__name__}: {error})"
        if reason is not None:
            return reject(consumer, message, reason)
        try:
            return handler(message)
        except Exception as error:
            # The broker went away: Celery's consumer reconnects and redelivers. kombu's Redis
            # transport counts KeyError among its connection errors, but a KeyError here is a
            # message missing a field (a protocol-1 body without "id"), not a lost connection.
            if isinstance(error, connection_errors) and not isinstance(error, LookupError):
                raise
            logger.warning("could not handle message %s", _message_id(message), exc_info=True)
            if not getattr(message, "acknowledged", False):
                reject(consumer, message, f"{type(error).__name__}: {error}")
            return None

    return on_task_received


def reject(consumer: Any, message: Any, reason: str) -> None:
    """Reject without requeue (dropped, or dead-lettered where the queue says so), logged."""
    logger.error(
        "rejected message %s (task %s): %s",
        _message_id(message),
        _header(message, "task"),
        reason[:500],
    )
    message.reject_log_error(logger, getattr(consumer, "connection_errors", ()))
    signals.task_rejected.send(sender=consumer, message=message, exc=None)


class MessageGuard(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: wrap `create_task_handler` so one bad message cannot end the worker.

    The event loop calls `consumer.create_task_handler()` each time it (re)starts, after
    this step's `__init__`, so the wrapper is in place for every connection.
    """

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        create = parent.create_task_handler
        if getattr(create, "_pipeline_guarded", False):
            return

        def create_task_handler(*args: Any, **kw: Any) -> Handler:
            return guard(parent, create(*args, **kw))

        create_task_handler._pipeline_guarded = True  # type: ignore[attr-defined]
        parent.create_task_handler = create_task_handler


def _time_limits_ok(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in value
        )
    )


def _kind(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _header(message: Any, name: str) -> str:
    headers = getattr(message, "headers", None)
    value = headers.get(name) if isinstance(headers, Mapping) else None
    return repr(value)[:120] if value is not None else "(none)"


def _message_id(message: Any) -> str:
    headers = getattr(message, "headers", None)
    task_id = headers.get("id") if isinstance(headers, Mapping) else None
    if isinstance(task_id, str) and task_id:
        return task_id[:120]
    properties = getattr(message, "properties", None) or {}
    tag = getattr(message, "delivery_tag", None)
    return f"(no id; correlation_id={properties.get('correlation_id')!r}, delivery_tag={tag!r})"
