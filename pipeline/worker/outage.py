"""The database lost mid-delivery: waited for where the execution stands, the claim found again.

An execution that loses the database keeps its message and its pool process, waits
(STORE_WAITS), then asks what became of its claim: still held, the function starts again
under it from the last chunk that committed (at most MAX_STARTS_PER_ATTEMPT starts in one
attempt; a start the database refused for want of resources is not counted, and is followed
by a pause that grows, RESOURCE_WAITS); completed, the completion stands; lost, the output is
discarded.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from pipeline import errors
from pipeline.models import Claim, Stats, Status
from pipeline.store import ClaimPath
from pipeline.worker import trouble

# How often the function may start within one attempt: a start whose output transaction the
# database broke (a restart, a cut connection) runs again under the same claim once the
# database answers, at most this many starts in all; past that the attempt is failed.
MAX_STARTS_PER_ATTEMPT = 5
# Pauses while waiting for the database where the execution stands (seconds, then the last
# one repeated): short, so a file carries on within a few seconds of the database's return.
STORE_WAITS = (0.2, 0.5, 1.0, 1.0, 2.0)
# Pauses before the function starts again after the database refused its output for want of
# resources (disk full, out of memory, too many connections, a deadlock): seconds, then the
# last one repeated. Such a start is not counted in MAX_STARTS_PER_ATTEMPT.
RESOURCE_WAITS = (0.5, 1.0, 2.0, 3.0, 5.0)

T = TypeVar("T")


def wait_for_store(call: Callable[[], T], what: str, *, patient: bool = True) -> T:
    """`call()`, again and again while the store is unavailable, pausing a little longer each
    time (STORE_WAITS): the execution waits where it stands for the database. Not `patient`:
    the first StoreUnavailable is raised."""
    n = 0
    while True:
        try:
            return call()
        except errors.StoreUnavailable as error:
            if not patient:
                raise
            pause = STORE_WAITS[min(n, len(STORE_WAITS) - 1)]
            # Once a minute per cause in this process, however many tasks wait.
            trouble.log.seen(error, f"{what}; waiting for the database")
            n += 1
            time.sleep(pause)
        except errors.StoreMisconfigured as error:
            # Waiting would never end: the task fails now, said once a minute in the log.
            trouble.log.seen(error, what, logging.ERROR)
            raise


class Restarts:
    """The starts of the function under one claim, within one attempt, and what each outage
    between them left of the claim."""

    def __init__(self, store: ClaimPath, claim: Claim) -> None:
        self.store = store
        self.claim = claim
        # Where each start of the function begins: the claim's position, then, after an
        # outage, the last chunk the database has (a chunk whose reply was lost may have
        # committed).
        self.resume_from = claim
        self.start = 0
        self.short = 0  # starts refused for the database's resources (disk full, ...): not counted
        self.last_error: BaseException | None = None

    def another(self) -> bool:
        """Whether the function may start (again) in this attempt; counts the start."""
        if self.start >= MAX_STARTS_PER_ATTEMPT:
            return False
        self.start += 1
        return True

    def after(self, error: errors.StoreUnavailable) -> Claim | Stats | None:
        """The database went away mid-execution: wait for it here, holding the message and
        the pool process, then find out what became of the claim. The claim to start again
        from if it is still ours (an output transaction possible again); the stats if our
        completion had committed; None if the claim was lost meanwhile."""
        claim = self.claim
        if getattr(error, "cause", None) in errors.RESOURCE_CAUSES:
            # Up but short of disk, memory or connections: not this attempt's fault, so not
            # one of its starts; the function starts again after a pause that grows (bounded
            # work however long the shortage lasts).
            self.start -= 1
            pause = RESOURCE_WAITS[min(self.short, len(RESOURCE_WAITS) - 1)]
            self.short += 1
            trouble.log.seen(error, f"{claim.file_url} starts again in {pause:g}s, same attempt")
            time.sleep(pause)
        else:
            trouble.log.seen(
                error,
                f"database lost during {claim.file_url} (start {self.start} of at most "
                f"{MAX_STARTS_PER_ATTEMPT} in this attempt)",
                always=True,
            )
        where = wait_for_store(lambda: _where_is(self.store, claim), f"resuming {claim.file_url}")
        if isinstance(where, Claim):
            # Still ours: the broken output transaction was rolled back. Before the function
            # starts again, an output transaction must be possible too (it may need a
            # connection of its own, which "too many clients" refuses while the claim's
            # works), so that a connection limit does not use up the starts.
            wait_for_store(lambda: _open_output(self.store), f"reopening {claim.file_url}")
            # Start again, same claim, same attempt, from the last chunk that committed.
            self.resume_from = where
            self.last_error = error
        return where

    def used_up(self) -> errors.TransactionBroken:
        """The error that fails the attempt once its starts are used up."""
        return errors.TransactionBroken(
            f"the database broke the output transaction of {self.claim.file_url} "
            f"{MAX_STARTS_PER_ATTEMPT} times in one attempt; last: {self.last_error}",
            url=self.claim.file_url,
        )


def _where_is(store: ClaimPath, claim: Claim) -> Claim | Stats | None:
    """After an outage: the claim, with the position of its last committed chunk, if it is
    still held (its lease renewed now); its stats if its completion had committed; None if
    the claim was lost meanwhile."""
    held = store.heartbeat(claim.file_url, claim.token) is not None
    row = store.get(claim.file_url)
    if row is None or row.token != claim.token:
        return None
    if held:
        return dataclasses.replace(
            claim, position=row.position, version=row.position_version, stats=row.stats
        )
    if row.status is Status.COMPLETED:
        return row.stats
    return None


def _open_output(store: ClaimPath) -> None:
    """Open (and end) a transaction like a function's output transaction."""
    with store.transaction():
        pass
