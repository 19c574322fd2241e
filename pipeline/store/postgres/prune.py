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
    ) -> Pruned:
        if attempts_older_than < 0 or keep < 1 or batch < 1:
            raise errors.InvalidInput("prune needs an age of at least 0 s, keep and batch >= 1")
        if forget_completed_older_than is not None and forget_completed_older_than < 0:
            raise errors.InvalidInput("the age of completed files to forget must be at least 0 s")
        files = 0
        if forget_completed_older_than is not None:
            files = self._until_done(
                "forget_completed", {"older_than": float(forget_completed_older_than)}, batch
            )
        attempts = self._until_done(
            "prune_attempts", {"older_than": float(attempts_older_than), "keep": keep}, batch
        )
        return Pruned(attempts=attempts, files=files)

    def _until_done(self, name: str, params: dict[str, object], batch: int) -> int:
        """Run a batched delete until a batch finds less than a full batch; the rows deleted.
        Each batch commits on its own (autocommit), outside the calls' deadline: an operator's
        command on a big table, not a hot-path call."""
        total = 0
        with translate(self.url), self._engine.connect() as conn:
            while True:
                deleted = max(
                    int(conn.execute(self._q[name], {**params, "batch": batch}).rowcount), 0
                )
                total += deleted
                if deleted < batch:
                    return total
