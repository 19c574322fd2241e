"""Database trouble said once a minute per cause, not once per task, and remembered.

Every process of a worker (its main process, each pool process) keeps its own: a pool
process waiting for the database with four tasks says so once a minute for each cause
(unreachable, disk full, too many connections, configuration, ...), with how many more times
it happened since it last said so. The last trouble is kept for `last()` (the metrics) and
written to the database once it answers again (`pipeline status`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time

from pipeline import errors

logger = logging.getLogger("pipeline")

# How often one cause is said per process (seconds).
EVERY = 60.0


@dataclasses.dataclass
class Trouble:
    """The last database trouble one process saw."""

    cause: str
    message: str
    first_at: float  # wall clock (time.time()) of the spell's first failure
    last_at: float


class TroubleLog:
    def __init__(self, every: float = EVERY) -> None:
        self.every = every
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._said: dict[str, float] = {}  # cause -> monotonic time it was last said
        self._unsaid: dict[str, int] = {}
        self._last: Trouble | None = None
        self._unreported: Trouble | None = None

    def seen(self, error: BaseException, what: str, level: int = logging.WARNING) -> None:
        """A failure of the database; logged if its cause was not said in the last minute."""
        cause = cause_of(error)
        now, wall = time.monotonic(), time.time()
        with self._lock:
            last = self._last
            if last is not None and last.cause == cause and wall - last.last_at < self.every:
                last.last_at, last.message = wall, str(error)
            else:
                self._last = Trouble(cause, str(error), wall, wall)
            self._unreported = self._last
            said = self._said.get(cause)
            if said is not None and now - said < self.every:
                self._unsaid[cause] = self._unsaid.get(cause, 0) + 1
                return
            self._said[cause] = now
            more = self._unsaid.pop(cause, 0)
        suffix = f" ({more} more like it in the last minute)" if more else ""
        logger.log(level, "database %s: %s: %s%s", cause, what, error, suffix)

    def last(self) -> Trouble | None:
        with self._lock:
            return self._last

    def take_unreported(self) -> Trouble | None:
        """The trouble not yet written to the database (once it answers), and forget it."""
        with self._lock:
            trouble, self._unreported = self._unreported, None
            return trouble

    def put_back(self, trouble: Trouble) -> None:
        with self._lock:
            if self._unreported is None:
                self._unreported = trouble


def cause_of(error: BaseException) -> str:
    """What a store error says about the database: its `cause`, or its kind."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, str) and cause:
        return cause
    if isinstance(error, errors.StoreMisconfigured):
        return "configuration"
    return "unreachable"


log = TroubleLog()
