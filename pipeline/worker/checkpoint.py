"""What the function sees as `checkpoint`: its claim, where to resume, and the transactions
its output is written in (one for the whole file, or one per chunk)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from pipeline import errors
from pipeline.models import Claim, Stats
from pipeline.store import ClaimPath, OutputTransaction

logger = logging.getLogger("pipeline")


class Chunk:
    """One chunk's output transaction: what it offers (`execute`, `execute_many`,
    `copy_rows`, ...), and where the chunk got to, set before the block ends."""

    def __init__(self, output: OutputTransaction, position: Any, stats: Stats) -> None:
        self._output = output
        #: where the next attempt starts if this chunk commits (JSON: a dict, a number, ...)
        self.position: Any = position
        #: the file's running totals once this chunk commits
        self.stats: Stats = stats
        #: bytes of the raw stream done, and the object's size, for `status` (optional)
        self.progress_bytes: int | None = None
        self.size_bytes: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._output, name)


class CheckpointContext:
    """What the function sees as `checkpoint`."""

    def __init__(
        self,
        store: ClaimPath,
        claim: Claim,
        stack: contextlib.ExitStack,
        *,
        lost: threading.Event | None = None,
        on_chunk: Callable[[Chunk], None] | None = None,
    ) -> None:
        self._store = store
        self._claim = claim
        self._stack = stack
        self._tx: OutputTransaction | None = None
        self._lost = lost or threading.Event()
        self._on_chunk = on_chunk
        #: where the last committed chunk of this generation got to (None: the beginning)
        self.position: Any = claim.position
        #: the object version that position was read from
        self.version: str | None = claim.version
        #: the running totals committed with that position
        self.stats: Stats = claim.stats if claim.position is not None else Stats()
        #: Stored on the row with the stats when the file completes (e.g. example problems).
        self.details: dict[str, Any] = {}

    file_url = property(lambda self: self._claim.file_url)
    token = property(lambda self: self._claim.token)
    attempt = property(lambda self: self._claim.attempt)
    max_attempts = property(lambda self: self._claim.max_attempts)
    generation = property(lambda self: self._claim.generation)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """The output transaction on the checkpoint database: `execute_many` and `copy_rows`,
        and every method of the driver's connection (`execute`, ... of a SQLAlchemy
        Connection on Postgres).

        It does not commit when the block ends: the file is marked completed in the same
        transaction after the function returns, fenced by the claim's token, then it
        commits. If the claim was lost meanwhile, everything written here is rolled back.
        """
        if self._tx is None:
            self._tx = self._stack.enter_context(self._store.transaction(token=self._claim.token))
        yield self._tx

    @property
    def output_transaction(self) -> OutputTransaction | None:
        return self._tx

    def resume(self, version: str | None, *, fingerprint: str | None = None) -> Any:
        """Where to start reading the object as it is now (`version`: its ETag, Last-Modified,
        or size + mtime + inode; None if the storage cannot tell): the committed position if
        it was read from the same version, else None. A position read from another version is
        never used: the object changed, so a new generation starts at the beginning
        (`fingerprint`, when given, is stored as the file's new fingerprint)."""
        # A version nobody can tell (None) pins nothing: such a read starts over.
        if self.position is not None and (version is None or version != self.version):
            generation = self._store.restart(self.file_url, self.token, version, fingerprint)
            logger.warning(
                "%s changed since its last chunk (version %s, now %s): generation %s starts "
                "at the beginning",
                self.file_url,
                self.version,
                version,
                generation,
            )
            self.position, self.stats = None, Stats()
        self.version = version
        return self.position

    @contextlib.contextmanager
    def chunk(self, position: Any = None) -> Iterator[Chunk]:
        """A chunk of output in a transaction of its own, committed with the position it got
        to when the block ends: the next attempt resumes there, and never writes it again.

        Set `position` here or on the chunk inside the block (with `stats`, the running
        totals, and optionally `progress_bytes` / `size_bytes`). Fenced like a completion: a
        chunk of a claim that was lost commits nothing and ends the execution. Each commit
        extends the lease. When the file's batch was cancelled the chunk still commits, and
        BatchCancelled is raised after it: the file stops there (`requeue` resumes it).
        """
        with self._store.transaction(token=self._claim.token) as output:
            chunk = Chunk(output, position, self.stats)
            yield chunk
            if chunk.position is None:
                raise ValueError("a chunk must say where it got to: set chunk.position")
            if self._lost.is_set():
                raise errors.LostClaim(url=self.file_url, token=self.token)
            lease_left = self._store.commit_chunk(
                self.file_url,
                self.token,
                chunk.position,
                version=self.version,
                stats=chunk.stats,
                progress_bytes=chunk.progress_bytes,
                size_bytes=chunk.size_bytes,
                transaction=output,
            )
        # committed: the next chunk, or the next attempt, starts here
        self.position, self.stats = chunk.position, chunk.stats
        if self._on_chunk is not None:
            self._on_chunk(chunk)
        if lease_left <= 0:
            # The batch was cancelled: the store stopped the file at this chunk (it is
            # `cancelled` now, its claim released); the function must not go on.
            raise errors.BatchCancelled(
                f"{self.file_url}: its batch was cancelled; stopped after this chunk",
                url=self.file_url,
            )
