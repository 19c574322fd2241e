"""The options of a checkpointed task: attempts, lease, which errors retry, backoff, limits."""

from __future__ import annotations

import dataclasses
import random

from pipeline import errors

# A file that runs longer than this is taken for stuck (a FIFO, a hung server): an hour.
DEFAULT_SOFT_TIME_LIMIT = 3600.0
# The hard limit's margin over the soft one: time for the function to clean up and fail.
HARD_LIMIT_GRACE = 60.0


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: delay n is uniform in [0, min(cap, base * 2**n)]."""

    base: float = 2.0
    cap: float = 300.0
    jitter: bool = True

    def delay(self, n: int) -> float:
        ceiling = min(self.cap, self.base * (2 ** max(n, 0)))
        return random.uniform(ceiling / 2, ceiling) if self.jitter else ceiling


@dataclasses.dataclass(frozen=True)
class Spec:
    """The options of one checkpointed task."""

    file_type: str
    max_attempts: int
    lease_seconds: float
    retry_on: tuple[type[BaseException], ...]
    dont_retry_on: tuple[type[BaseException], ...]
    backoff: Backoff
    wants_checkpoint: bool

    def retryable(self, error: BaseException) -> bool:
        if isinstance(error, (*self.dont_retry_on, errors.PermanentError)):
            return False
        return isinstance(error, self.retry_on)
