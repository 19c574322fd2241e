"""The lease keeper: one thread per process renews the lease of every claim it runs."""

from __future__ import annotations

import logging
import os
import threading
import time

from pipeline import errors
from pipeline.models import Claim
from pipeline.store import ClaimPath
from pipeline.worker import trouble

logger = logging.getLogger("pipeline")


class Held:
    """A claim whose lease the keeper renews; `lost` is set when a renewal finds it gone."""

    __slots__ = ("claim", "due", "interval", "lost", "misses", "store")

    def __init__(self, store: ClaimPath, claim: Claim) -> None:
        self.store = store
        self.claim = claim
        self.interval = max(claim.lease_seconds / 3.0, 0.05)
        self.due = time.monotonic() + self.interval
        self.lost = threading.Event()
        self.misses = 0  # renewals failed in a row (database unreachable)


class LeaseKeeper:
    """One thread per process renews the lease of every claim it runs, every lease/3.

    It runs in the process that runs the function, so a frozen process (SIGSTOP) renews
    nothing and loses its leases, as it must. One thread, not one per task: starting a
    thread per task costs more than the claim itself.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # A fork copies neither the thread nor a usable lock: start afresh in the child.
        self._cond = threading.Condition()
        self._held: dict[int, Held] = {}
        self._thread: threading.Thread | None = None
        # When the keeper will next wake by itself (None: waiting for a first claim).
        self._wake_at: float | None = None

    def hold(self, store: ClaimPath, claim: Claim) -> Held:
        held = Held(store, claim)
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="pipeline-lease-keeper", daemon=True
                )
                self._thread.start()
            self._held[claim.token] = held
            # Wake the keeper only if it would otherwise sleep past this claim's first renewal:
            # one task after another (the common case) then costs no thread switch at all.
            if self._wake_at is None or held.due < self._wake_at:
                self._cond.notify()
        return held

    def release(self, held: Held) -> None:
        with self._cond:
            self._held.pop(held.claim.token, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [h for h in self._held.values() if h.due <= now]
                if not due:
                    self._wake_at = min((h.due for h in self._held.values()), default=None)
                    self._cond.wait(None if self._wake_at is None else self._wake_at - now)
                    continue
                for h in due:
                    h.due = now + h.interval
            for h in due:
                self._renew(h)

    def _renew(self, held: Held) -> None:
        url, token = held.claim.file_url, held.claim.token
        try:
            left = held.store.heartbeat(url, token)
            held.misses = 0
            if left is None:
                logger.warning("lost the claim on %s (token %s)", url, token)
                held.lost.set()
                self.release(held)
        except (errors.StoreUnavailable, errors.StoreMisconfigured) as error:
            # Keep trying: the lease is long enough to survive a missed beat or two, and a
            # longer outage is made good by the sweep's gap rule. Said once a minute per cause
            # in this process, not every lease/3 for every claim.
            held.misses += 1
            trouble.log.seen(error, f"heartbeat for {url} failed ({held.misses} in a row)")
        except Exception:  # never let the keeper die
            logger.exception("heartbeat for %s crashed", url)


keeper = LeaseKeeper()
