"""Hooks in the worker's main process: a dead pool process's file released at once, the
pool checked for dead processes every half second, and the sweep thread."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import bootsteps
from celery.worker.request import Request

from pipeline import errors, settings
from pipeline.store import Store
from pipeline.worker import runtime, sweep, trouble

logger = logging.getLogger("pipeline")


class CheckpointRequest(Request):  # type: ignore[misc]
    """A task request that releases its file at once when its pool process dies.

    Runs in the worker's main process, which saw the child die (SIGKILL, OOM, or killed by
    the pool at the hard time limit): the claim that child held for this task is released
    (attempt recorded lost) before Celery requeues or acks the message, so the file is
    granted again without waiting for the lease to run out.
    """

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        exc = exc_info.exception
        # billiard wraps the error it reports for a dead child
        exc = getattr(exc, "exc", exc) if type(exc).__name__ == "ExceptionWithTraceback" else exc
        if isinstance(exc, WorkerLostError):
            self._release("died")
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft:
            # The pool kills the child and Celery acks the message (a failure): the released
            # row is due at once, so the sweep re-enqueues it if nothing else does.
            self._release(f"was killed at the hard time limit of {timeout} s")
        super().on_timeout(soft, timeout)

    def _release(self, what: str) -> None:
        if not (self.worker_pid and self.args):
            return
        worker_id = f"{self.hostname or 'local'}:{self.worker_pid}"
        try:
            status = runtime.get_store().abandon(str(self.args[0]), worker_id, self.id)
            if status is not None:
                logger.warning(
                    "%s %s on %s; released it (now %s)", worker_id, what, self.args[0], status
                )
        except Exception:
            # Never break the worker's main loop: the lease expiry still frees the file.
            logger.exception("could not release %s after its process %s", self.args[0], what)


# How often the prefork pool looks for children that died (Celery's own timer: 5 s).
POOL_MAINTENANCE_INTERVAL = 0.5


class PoolMaintenance(bootsteps.StartStopStep):  # type: ignore[misc]
    """Check the prefork pool for dead children every half second, not every five.

    A child's death is reported (WorkerLostError, then CheckpointRequest releasing its file)
    only when the pool's maintenance runs after worker_lost_wait; this is the same call the
    pool makes on its own 5 s timer, so a lost file is back in about a second.
    """

    requires = frozenset({"celery.worker.components:Pool", "celery.worker.components:Hub"})

    def start(self, worker: Any) -> None:
        pool = getattr(getattr(worker, "pool", None), "_pool", None)
        maintain = getattr(pool, "maintain_pool", None)
        if worker.hub is not None and maintain is not None:
            worker.hub.call_repeatedly(POOL_MAINTENANCE_INTERVAL, maintain)


class Sweeper(bootsteps.StartStopStep):  # type: ignore[misc]
    """The sweep (reaper) inside every worker, so nobody has to remember `celery beat`.

    A thread of the worker's main process, not a task: it never waits behind queued files, and
    a frozen or busy pool cannot hold it up. Every worker runs one; the database lets one sweep
    through at a time (an advisory lock in pipeline_reap_v2), the others return at once.
    PIPELINE_SWEEP=0 turns the sweep off (beat or `pipeline reap` then do the job). With
    PIPELINE_PRUNE_AFTER set, the sweep prunes attempt history too, one worker of the fleet
    per PIPELINE_PRUNE_INTERVAL (sweep.Pruner).

    Each round first records the worker's heartbeat (`pipeline_workers`, which the metrics
    count), sweep or not: a worker whose thread stops answering stops being counted live.
    """

    requires = frozenset({"celery.worker.components:Pool"})

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        sweeping = settings.SWEEP.get()
        if not sweeping:
            logger.info("sweep: off in this worker (PIPELINE_SWEEP); heartbeat only")
        name = str(getattr(worker, "hostname", None) or "local")
        self._thread = threading.Thread(
            target=self._loop,
            args=(worker.app, name, sweeping),
            name="pipeline-sweeper",
            daemon=True,
        )
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)  # let it close its connections

    def _loop(self, celery_app: Any, name: str, sweeping: bool) -> None:
        interval = settings.REAP_INTERVAL.get()
        complained = False
        # Its own store, opened on PIPELINE_DATABASE_URL and closed when the worker stops: the
        # process's store may be swapped or closed by whoever set it (tests, embedded mode).
        store: Store | None = None
        jitter = random.Random()
        pruner = sweep.Pruner.from_settings()  # PIPELINE_PRUNE_AFTER: off unless set
        pid = os.getpid()
        # The first round at once, heartbeat only: a worker is counted as soon as it starts,
        # and its first sweep comes an interval later, as it always has.
        wait, first = 0.0, True
        try:
            # Jittered, so the workers of a fleet started together do not all ask at once; a
            # generator of its own, leaving the process's `random` state to the tasks.
            while not self._stop.wait(wait):
                wait = interval * jitter.uniform(0.8, 1.0)
                try:
                    if store is None:
                        store = runtime.open_thread_store()
                    self._heartbeat(store, name, pid, interval)
                    if sweeping and not first:
                        sweep.reap_once(store, celery_app)
                        # After the sweep, so that a long prune never delays a takeover.
                        pruner.round(store)
                    # The database answers again: say what the trouble was (`pipeline status`).
                    trouble.report(store, name)
                    first = False
                    complained = False
                except (errors.StoreUnavailable, errors.StoreMisconfigured) as error:
                    trouble.log.seen(error, "sweep skipped")  # once a minute per cause
                except errors.PipelineError as error:  # no schema, no URL set
                    if not complained:  # once per spell, not every few seconds
                        logger.warning("sweep skipped: %s", error)
                    complained = True
                except Exception:  # never let the sweeper die; the next round tries again
                    logger.exception("sweep failed")
        finally:
            if store is not None:
                with contextlib.suppress(Exception):  # a lost one ages out of the live count
                    store.worker_stopped(name, pid)
                runtime.close_thread_store(store)

    _heartbeat_failing = False

    def _heartbeat(self, store: Store, name: str, pid: int, interval: float) -> None:
        # Apart from the sweep: a heartbeat that cannot be written (a schema not yet upgraded)
        # must not stop the sweep; said once per spell.
        try:
            store.worker_seen(name, pid, interval)
        except (errors.StoreUnavailable, errors.StoreMisconfigured):
            raise  # the database's trouble: said (once a minute) and remembered by the loop
        except errors.PipelineError as error:
            if not self._heartbeat_failing:
                logger.warning("worker heartbeat not recorded: %s", error)
            self._heartbeat_failing = True
        else:
            self._heartbeat_failing = False
