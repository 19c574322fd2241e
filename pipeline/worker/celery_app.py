"""The Celery app, the per-process store its tasks use, and the reaper task."""

from __future__ import annotations

import logging
import os
import random
import threading
from typing import Any

from celery import Celery, bootsteps
from celery.signals import beat_init, worker_process_init

from pipeline import config, errors, masking
from pipeline.sources import producer, watchspec
from pipeline.store import DEFAULT_WAITING_SECONDS, Store
from pipeline.worker import messages

logger = logging.getLogger("pipeline")

app = Celery("pipeline")
app.config_from_object("pipeline.worker.celeryconfig")

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


app.steps["worker"].add(PoolMaintenance)
app.steps["consumer"].add(messages.MessageGuard)  # a malformed message is rejected, not fatal

_store: Store | None = None
# The process that opened or set _store: only a forked child must let go of its connections.
_store_pid: int | None = None
_store_lock = threading.Lock()


def get_store() -> Store:
    """This process's store on PIPELINE_DATABASE_URL, opened on first use."""
    global _store, _store_pid
    if _store is None:
        with _store_lock:
            if _store is None:
                import pipeline

                _store = pipeline.open_store()
                _store_pid = os.getpid()
    return _store


def set_store(store: Store | None) -> None:
    """Use this store in this process (tests, embedded mode)."""
    global _store, _store_pid
    _store = store
    _store_pid = os.getpid()


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # A prefork child inherits the parent's pool: its sockets must not be shared. The solo
    # pool sends this signal too, in the process that opened the store: nothing was forked,
    # and letting go of its connections (without closing them) would only leak them.
    if _store is not None and _store_pid != os.getpid():
        _store.after_fork()


def enqueue(work: list[Any], *, default_task: str | None = None, celery_app: Any = None) -> int:
    """Send one task per file of `work` (reap / requeue results); returns how many were sent."""
    target = celery_app or app
    sent = 0
    with target.producer_or_acquire() as producer:
        for item in work:
            name = item.task_name or default_task
            if name is None:
                logger.warning("no task name stored for %s; not re-enqueued", item.file_url)
                continue
            if item.status.terminal:
                continue
            target.send_task(name, args=[item.file_url], producer=producer)
            sent += 1
    return sent


def reap_once(
    store: Store | None = None,
    *,
    waiting_seconds: float | None = None,
    celery_app: Any = None,
) -> dict[str, int]:
    """One sweep: move expired claims on and re-enqueue what needs a task; returns counts."""
    store = store or get_store()
    waiting = (
        waiting_seconds
        if waiting_seconds is not None
        else float(os.environ.get("PIPELINE_REAP_WAITING_SECONDS") or DEFAULT_WAITING_SECONDS)
    )
    depth = queue_depth(celery_app or app)
    if depth:
        # Messages are still queued: a pending row that waited long may simply be behind them
        # (a big batch drains slower than any threshold), and re-enqueueing it would flood the
        # broker with duplicates. Rows whose message was lost are handed back once the queue
        # drains. Expired leases and overdue retries are handed back either way.
        logger.debug("sweep: %d messages queued; waiting rows left for later", depth)
    work = store.reap(waiting_seconds=None if depth else waiting)
    dead = sum(1 for w in work if w.status.terminal)
    sent = enqueue(work, celery_app=celery_app)
    if work:
        logger.info("sweep: %d rows moved on, %d re-enqueued, %d dead", len(work), sent, dead)
    return {"reaped": len(work), "enqueued": sent, "dead": dead, "queued": depth or 0}


def sweep_interval() -> float:
    """Seconds between sweeps (PIPELINE_REAP_INTERVAL, default 5)."""
    return float(os.environ.get("PIPELINE_REAP_INTERVAL") or 5)


class Sweeper(bootsteps.StartStopStep):  # type: ignore[misc]
    """The sweep (reaper) inside every worker, so nobody has to remember `celery beat`.

    A thread of the worker's main process, not a task: it never waits behind queued files, and
    a frozen or busy pool cannot hold it up. Every worker runs one; the database lets one sweep
    through at a time (an advisory lock in pipeline_reap_v2), the others return at once.
    PIPELINE_SWEEP=0 turns it off (beat or `pipeline reap` then do the job).
    """

    requires = frozenset({"celery.worker.components:Pool"})

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        if os.environ.get("PIPELINE_SWEEP", "1").strip().lower() in ("0", "false", "no", "off"):
            logger.info("sweep: off in this worker (PIPELINE_SWEEP)")
            return
        self._thread = threading.Thread(
            target=self._loop, args=(worker.app,), name="pipeline-sweeper", daemon=True
        )
        self._thread.start()

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)  # let it close its connections

    def _loop(self, celery_app: Any) -> None:
        interval = sweep_interval()
        complained = False
        # Its own store, opened on PIPELINE_DATABASE_URL and closed when the worker stops: the
        # process's store may be swapped or closed by whoever set it (tests, embedded mode).
        store: Store | None = None
        jitter = random.Random()
        try:
            # Jittered, so the workers of a fleet started together do not all ask at once; a
            # generator of its own, leaving the process's `random` state to the tasks.
            while not self._stop.wait(interval * jitter.uniform(0.8, 1.0)):
                try:
                    if store is None:
                        import pipeline

                        store = pipeline.open_store()
                        _sweep_stores.append(store)
                    reap_once(store, celery_app=celery_app)
                    complained = False
                except errors.PipelineError as error:  # unreachable, no schema, no URL set
                    if not complained:  # once per spell, not every few seconds
                        logger.warning("sweep skipped: %s", error)
                    complained = True
                except Exception:  # never let the sweeper die; the next round tries again
                    logger.exception("sweep failed")
        finally:
            if store is not None:
                store.close()
                _sweep_stores.remove(store)


# The sweepers' stores, referenced here so that a pool process forked from the worker never
# frees (and so never closes, on the parent's socket) a sweeper's connection: it lets go of
# them instead, as the process's own store does (see _after_fork).
_sweep_stores: list[Store] = []


def _release_sweep_stores() -> None:
    for store in _sweep_stores:
        store.after_fork()


os.register_at_fork(after_in_child=_release_sweep_stores)


app.steps["worker"].add(Sweeper)


def queue_depth(celery_app: Any, queue: str | None = None) -> int | None:
    """Messages waiting in the queue (0 when it does not exist), None when the broker cannot
    be asked."""
    name = queue or celery_app.conf.task_default_queue
    try:
        with celery_app.connection_for_read() as conn:
            channel = conn.default_channel
            try:
                return int(channel.queue_declare(queue=name, passive=True).message_count)
            except conn.channel_errors:
                return 0  # no such queue: nothing waiting (e.g. the broker was flushed)
    except Exception as error:  # broker down: the re-enqueue below would fail anyway
        logger.warning("reaper: cannot read the depth of queue %s: %s", name, error)
        return None


@app.task(name="pipeline.reap", ignore_result=True, acks_late=False)
def reap(waiting_seconds: float | None = None) -> dict[str, int]:
    """Beat task: the safety net for files whose message was acked or lost."""
    try:
        return reap_once(waiting_seconds=waiting_seconds)
    except errors.StoreUnavailable as error:
        # Next beat tick tries again; nothing was changed.
        logger.warning("reaper skipped: %s", error)
        return {"reaped": 0, "enqueued": 0, "dead": 0, "queued": 0}


@app.task(name=watchspec.SCAN_TASK, ignore_result=True, acks_late=False)
def watch_scan(
    pattern: str,
    batch_id: str = watchspec.DEFAULT_BATCH,
    task_name: str = producer.DEFAULT_TASK,
    file_type: str = "events",
) -> dict[str, object]:
    """Beat task: one scan of a watched pattern (see pipeline.watch); returns its report."""
    from pipeline.sources import watch

    with app.producer_or_acquire() as publisher:

        def send(name: str, url: str) -> None:
            app.send_task(name, args=[url], producer=publisher)

        report = watch.scan(
            get_store(), pattern, send, task_name=task_name, batch_id=batch_id, file_type=file_type
        )
    (logger.warning if report.error else logger.info)("%s", report.line())
    return report.as_dict()


@beat_init.connect
def _schedule_watches(sender: Any, **_: Any) -> None:
    """Add a scan entry per watched pattern (`pipeline_watch`, from PIPELINE_WATCH) to the
    schedule beat runs; a malformed setting stops beat at start, with its reason."""
    setting = sender.app.conf.get("pipeline_watch")
    try:
        specs = watchspec.parse(setting)
    except errors.InvalidInput as error:
        logger.critical("beat: %s", error)
        # SystemExit, not an Exception: Celery's signal dispatch logs and swallows those,
        # and beat would run on without the watches.
        raise SystemExit(2) from None
    if specs:
        sender.scheduler.update_from_dict(watchspec.beat_entries(specs))
    for spec in specs:
        logger.info("beat: watching %s", masking.scrub(spec.shown))


def describe() -> str:
    """Where the app points, with secrets masked."""
    return (
        f"broker {config.mask_url(app.conf.broker_url)}, "
        f"database {config.mask_url(config.database_url())}"
    )
