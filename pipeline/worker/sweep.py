"""One sweep: expired claims moved on, lost messages and overdue retries handed back."""

from __future__ import annotations

import logging
from typing import Any

from pipeline import settings
from pipeline.models import Pruned
from pipeline.sender import Sender
from pipeline.store import DEFAULT_WAITING_SECONDS, Admin, Registry

logger = logging.getLogger("pipeline")


def default_waiting_seconds() -> float:
    """How long a pending row may wait for its task (PIPELINE_REAP_WAITING_SECONDS)."""
    value = settings.REAP_WAITING_SECONDS.get()
    return DEFAULT_WAITING_SECONDS if value is None else value


def reap_once(store: Registry, app: Any, *, waiting_seconds: float | None = None) -> dict[str, int]:
    """One sweep: move expired claims on and re-enqueue what needs a task; returns counts."""
    waiting = waiting_seconds if waiting_seconds is not None else default_waiting_seconds()
    depth = queue_depth(app)
    if depth:
        # Messages are still queued: a pending row that waited long may simply be behind them
        # (a big batch drains slower than any threshold), and re-enqueueing it would flood the
        # broker with duplicates. Rows whose message was lost are handed back once the queue
        # drains. Expired leases and overdue retries are handed back either way.
        logger.debug("sweep: %d messages queued; waiting rows left for later", depth)
    # The gap rule at two sweep intervals: a longer silence of the whole fleet is the
    # database's (or everybody's) absence, and is given back to the live leases.
    gap = 2.0 * settings.REAP_INTERVAL.get()
    work = store.reap(waiting_seconds=None if depth else waiting, gap_seconds=gap)
    dead = sum(1 for w in work if w.status.terminal)
    sent = 0
    if len(work) > dead:
        with Sender(app) as sender:
            sent = sender.send_work(work)
    if work:
        logger.info("sweep: %d rows moved on, %d re-enqueued, %d dead", len(work), sent, dead)
    return {"reaped": len(work), "enqueued": sent, "dead": dead, "queued": depth or 0}


def queue_depth(app: Any, queue: str | None = None) -> int | None:
    """Messages waiting in the queue (0 when it does not exist), None when the broker cannot
    be asked."""
    name = queue or app.conf.task_default_queue
    try:
        with app.connection_for_read() as conn:
            channel = conn.default_channel
            try:
                return int(channel.queue_declare(queue=name, passive=True).message_count)
            except conn.channel_errors:
                return 0  # no such queue: nothing waiting (e.g. the broker was flushed)
    except Exception as error:  # broker down: the re-enqueue below would fail anyway
        logger.warning("reaper: cannot read the depth of queue %s: %s", name, error)
        return None


# The deletes a sweep round does at most (5,000 rows each): a first prune of a big history is
# spread over the rounds that follow, so the round's sweep and heartbeat stay on time.
PRUNE_BATCHES_PER_ROUND = 10


class Pruner:
    """The sweep's prune of attempt history (PIPELINE_PRUNE_AFTER): one worker of the fleet
    per PIPELINE_PRUNE_INTERVAL (the database hands the turn out), a few batches per round,
    the rest in the rounds after it. Completed files are never forgotten here: that is
    `pipeline prune --forget-completed-older-than`, asked for by an operator."""

    def __init__(
        self,
        after: float | None,
        interval: float,
        *,
        batches_per_round: int = PRUNE_BATCHES_PER_ROUND,
        batch: int | None = None,
    ) -> None:
        self.after = after
        self.interval = interval
        self.batches_per_round = batches_per_round
        self.batch = batch  # rows per delete; None: the store's (5,000)
        self._more = False  # a turn taken and not finished: go on without asking again

    @classmethod
    def from_settings(cls) -> Pruner:
        return cls(settings.PRUNE_AFTER.get(), settings.PRUNE_INTERVAL.get())

    def round(self, store: Admin) -> Pruned | None:
        """Prune if this worker has the turn; what was deleted (None: not its turn, or off).
        A turn interrupted (the database away) is not taken again until the next interval."""
        if self.after is None:
            return None
        if not self._more and not store.take_turn("prune", self.interval):
            return None
        self._more = False
        size = {} if self.batch is None else {"batch": self.batch}
        pruned = store.prune(self.after, keep=1, max_batches=self.batches_per_round, **size)
        self._more = pruned.more
        if pruned.attempts or pruned.more:
            logger.info(
                "sweep: pruned %d attempts that ended over %g s ago%s",
                pruned.attempts,
                self.after,
                "; more in the next round" if pruned.more else "",
            )
        return pruned
