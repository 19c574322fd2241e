"""Database trouble said once a minute per cause, not once per task, and remembered.

Every process of a worker (its main process, each pool process) keeps its own: a pool
process waiting for the database with four tasks says so once a minute for each cause
(unreachable, disk full, too many connections, configuration, ...), with how many more times
it happened since it last said so. The last trouble is kept for `last()` (the metrics) and
written to the database once it answers again (`pipeline status`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import threading
import time

from pipeline import errors
from pipeline.store import Presence

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
        self._spells: dict[str, Trouble] = {}  # cause -> its latest spell
        self._unreported: set[str] = set()

    def seen(
        self,
        error: BaseException,
        what: str,
        level: int = logging.WARNING,
        *,
        always: bool = False,
    ) -> None:
        """A failure of the database; logged if its cause was not said in the last minute, or
        `always`: an event of one file's execution (its function broken off, at most the starts
        of an attempt), not a wait that repeats."""
        cause = cause_of(error)
        # What the server said, for `pipeline status` (the whole message goes to the log).
        detail = str(getattr(error, "detail", None) or error)
        now, wall = time.monotonic(), time.time()
        with self._lock:
            spell = self._spells.get(cause)
            if spell is not None and wall - spell.last_at < self.every:
                spell.last_at, spell.message = wall, detail
            else:
                self._spells[cause] = Trouble(cause, detail, wall, wall)
            self._unreported.add(cause)
            said = self._said.get(cause)
            if not always and said is not None and now - said < self.every:
                self._unsaid[cause] = self._unsaid.get(cause, 0) + 1
                return
            self._said[cause] = now
            more = self._unsaid.pop(cause, 0)
        suffix = f" ({more} more like it in the last minute)" if more else ""
        logger.log(level, "database %s: %s: %s%s", cause, what, error, suffix)

    def last(self) -> Trouble | None:
        """The latest trouble of any cause."""
        with self._lock:
            return max(self._spells.values(), key=lambda t: t.last_at, default=None)

    def has_unreported(self) -> bool:
        return bool(self._unreported)  # a glance without the lock: report() takes it

    def take_unreported(self) -> list[Trouble]:
        """The spells not yet written to the database (once it answers), and forget them."""
        with self._lock:
            spells = [dataclasses.replace(self._spells[c]) for c in sorted(self._unreported)]
            self._unreported.clear()
            return spells

    def put_back(self, spells: list[Trouble]) -> None:
        with self._lock:
            self._unreported.update(t.cause for t in spells)


def report(store: Presence, seen_by: str) -> None:
    """Write this process's trouble to the database, now that it answers (once per spell)."""
    spells = log.take_unreported()
    try:
        for trouble in spells:
            store.record_trouble(
                trouble.cause,
                trouble.message,
                seen_by,
                dt.datetime.fromtimestamp(trouble.first_at, dt.UTC),
                dt.datetime.fromtimestamp(trouble.last_at, dt.UTC),
            )
    except errors.PipelineError:
        log.put_back(spells)  # the next round tries again
        raise


def cause_of(error: BaseException) -> str:
    """What a store error says about the database: its `cause`, or its kind."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, str) and cause:
        return cause
    if isinstance(error, errors.StoreMisconfigured):
        return "configuration"
    return "unreachable"


log = TroubleLog()
