"""The one way to send "one task per file": submit, watch, requeue, the sweep and beat use it.

A `Sender` holds one broker connection, opened (with one retry) when it is made, so that a
broker that is down is said at once, before any row is registered; every broker error while
connecting or sending becomes `BrokerUnavailable`, with the URL's password masked.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import kombu.exceptions

from pipeline import errors, masking, tracing
from pipeline.models import Work

logger = logging.getLogger("pipeline")


class Sender:
    """Sends tasks of `app` over one connection to its broker (or to `broker_url`)."""

    def __init__(self, app: Any, *, broker_url: str | None = None) -> None:
        self.app = app
        self.broker_url = broker_url or app.conf.broker_url
        # Whatever connecting raises (a malformed URL, a refused connection, kombu's or the
        # transport's own errors) is the broker's problem, said in one line.
        with self._translated("unreachable", Exception):
            self._connection = app.connection_for_write(broker_url)
            # Connect now, with one retry: kombu connects lazily on the first publish and then
            # retries for ever, so a down broker would surface mid-submit, after rows were
            # registered.
            self._connection.ensure_connection(max_retries=1)
            self._producer = app.amqp.Producer(self._connection)
        self._lost = (
            kombu.exceptions.KombuError,
            OSError,
            *self._connection.connection_errors,
            *self._connection.channel_errors,
        )

    def send(self, task_name: str, file_url: str) -> None:
        """Enqueue one task for one file."""
        with (
            self._translated("lost while sending", self._lost),
            tracing.submit(task_name, file_url),
        ):
            self.app.send_task(task_name, args=[file_url], producer=self._producer)

    def send_work(self, work: Iterable[Work], *, default_task: str | None = None) -> int:
        """A task for every file of `work` that is not terminal (reap and requeue results);
        how many were sent."""
        sent = 0
        for item in work:
            if item.status.terminal:
                continue
            name = item.task_name or default_task
            if name is None:
                logger.warning("no task name stored for %s; not re-enqueued", item.file_url)
                continue
            self.send(name, item.file_url)
            sent += 1
        return sent

    def close(self) -> None:
        release = getattr(self._producer, "release", None)
        if release is not None:
            release()
        self._connection.release()

    def __enter__(self) -> Sender:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except Exception:  # closing a connection the broker already dropped
            logger.debug("closing the broker connection failed", exc_info=True)

    @contextlib.contextmanager
    def _translated(
        self, what: str, kinds: type[Exception] | tuple[type[Exception], ...]
    ) -> Iterator[None]:
        """Errors of `kinds` as BrokerUnavailable, the URL's password masked."""
        try:
            yield
        except errors.PipelineError:
            raise
        except kinds as error:
            shown = masking.mask_url(self.broker_url)
            raise errors.BrokerUnavailable(
                f"broker {shown} {what}: {masking.scrub(errors.one_line(error), self.broker_url)}",
                url=shown,
            ) from error
