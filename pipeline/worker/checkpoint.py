"""What the function sees as `checkpoint`: its claim, and the transaction for its output."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from pipeline.models import Claim
from pipeline.store import ClaimPath, OutputTransaction


class CheckpointContext:
    """What the function sees as `checkpoint`: the claim and a transaction for its output."""

    def __init__(self, store: ClaimPath, claim: Claim, stack: contextlib.ExitStack) -> None:
        self._store = store
        self._claim = claim
        self._stack = stack
        self._tx: OutputTransaction | None = None
        #: Stored on the row with the stats when the file completes (e.g. example problems).
        self.details: dict[str, Any] = {}

    file_url = property(lambda self: self._claim.file_url)
    token = property(lambda self: self._claim.token)
    attempt = property(lambda self: self._claim.attempt)
    max_attempts = property(lambda self: self._claim.max_attempts)

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
