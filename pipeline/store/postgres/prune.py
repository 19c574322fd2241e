"""`pipeline prune`: attempt history that does not grow for ever, and, on request only,
completed files forgotten.

`file_attempts` gains a row per ended attempt. Past a retention the history goes, except each
file's latest attempts (what `status --file` shows first). Completed rows stay: they are what
makes a resubmission of the same file a no-op. An operator may forget the ones completed
before a given age (as Auto Loader's `maxFileAge` does); a resubmission of a forgotten file
then runs it again. Deleted in batches, each its own short transaction, so workers are never
held up behind one long delete.
"""

from __future__ import annotations

from pipeline import errors
from pipeline.models import Pruned
from pipeline.store.postgres.boundary import translate
from pipeline.store.postgres.connection import Connections

BATCH = 5000


class Pruning(Connections):
    """`prune`."""

    def prune(
        self,
        attempts_older_than: float,
        *,
        keep: int = 1,
        forget_completed_older_than: float | None = None,
        batch: int = BATCH,
        max_batches: int | None = None,
    ) -> Pruned:
        if attempts_older_than < 0 or keep < 1 or batch < 1:
            raise errors.InvalidInput("prune needs an age of at least 0 s, keep and batch >= 1")
        if max_batches is not None and max_batches < 1:
            raise errors.InvalidInput("prune needs max_batches >= 1 (or none: until done)")
        if forget_completed_older_than is not None and forget_completed_older_than < 0:
            raise errors.InvalidInput("the age of completed files to forget must be at least 0 s")
        files, more = 0, False
        left = max_batches
        if forget_completed_older_than is not None:
            files, used, more = self._until_done(
                "forget_completed", {"older_than": float(forget_completed_older_than)}, batch, left
            )
            left = None if left is None else left - used
        attempts = 0
        if left is None or left > 0:
            attempts, _, more = self._until_done(
                "prune_attempts",
                {"older_than": float(attempts_older_than), "keep": keep},
                batch,
                left,
            )
        else:
            more = True
        return Pruned(attempts=attempts, files=files, more=more)

    def _until_done(
        self, name: str, params: dict[str, object], batch: int, max_batches: int | None
    ) -> tuple[int, int, bool]:
        """Run a batched delete until a batch finds less than a full batch, or `max_batches`
        ran; the rows deleted, the batches run, and whether there may be more.

        Each batch commits on its own (autocommit), outside the calls' deadline: a command
        on a big table, not a hot-path call. Its connection is closed at the end, not kept in
        the pool: the sweep prunes once an interval, and must not hold a second connection
        for the rest of the time (the README's connection budget)."""
        total = runs = 0
        with translate(self.url), self._using(), self._engine.connect() as conn:
            try:
                while max_batches is None or runs < max_batches:
                    deleted = max(
                        int(conn.execute(self._q[name], {**params, "batch": batch}).rowcount), 0
                    )
                    total += deleted
                    runs += 1
                    if deleted < batch:
                        return total, runs, False
                return total, runs, True
            finally:
                conn.invalidate()  # closed, not pooled

    def take_turn(self, chore: str, interval_seconds: float) -> bool:
        """Whether the caller does the periodic `chore` now: true for one caller of the whole
        fleet per interval (queries.sql `chore_turn`)."""
        return bool(self._fast("chore_turn", {"name": chore, "interval": float(interval_seconds)}))
