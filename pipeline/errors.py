"""The project's exceptions: one root, each class's docstring is its default message."""

from __future__ import annotations

# What a store error says about the database (StoreUnavailable's and StoreMisconfigured's
# `cause`), as status, the metrics and the logs name it.
UNREACHABLE = "unreachable"
SHUTTING_DOWN = "shutting down or starting up"
TOO_MANY_CONNECTIONS = "too many connections"
DISK_FULL = "disk full"
OUT_OF_MEMORY = "out of memory"
OUT_OF_RESOURCES = "out of resources"
CONFLICT = "serialization failure or deadlock"
MISCONFIGURED = "configuration"
# The database is up but short of something: a start of the function that it refused is not
# counted against the attempt's starts (the wait before the next one grows instead).
RESOURCE_CAUSES = frozenset(
    {TOO_MANY_CONNECTIONS, DISK_FULL, OUT_OF_MEMORY, OUT_OF_RESOURCES, CONFLICT}
)


class PipelineError(Exception):
    """Something went wrong in pipeline."""

    def __init__(self, message: str | None = None, **data: object) -> None:
        self.data = data
        for key, value in data.items():
            setattr(self, key, value)
        super().__init__(message or (self.__doc__ or "").strip())


class StoreUnavailable(PipelineError):
    """The checkpoint database cannot be reached; nothing was changed, try again."""


class StoreMisconfigured(PipelineError):
    """The checkpoint database refuses this configuration (authentication, unknown database,
    a startup parameter or protocol it does not accept): fix PIPELINE_DATABASE_URL; waiting
    will not help."""


class BrokerUnavailable(PipelineError):
    """The broker cannot be reached; the tasks not sent are handed out again by the sweep."""


class SchemaMissing(PipelineError):
    """The checkpoint schema is missing or out of date: run `pipeline db upgrade`."""


class LostClaim(PipelineError):
    """This execution no longer holds the claim on the file; its writes were not applied."""

    @classmethod
    def of(cls, url: str, token: int, what: str) -> LostClaim:
        """The error for a stale write: `what` says what was not applied."""
        return cls(f"claim on {url} (token {token}) was lost; {what}", url=url, token=token)


class InvalidURL(PipelineError):
    """The file URL is not valid."""


class ListingFailed(PipelineError):
    """The files matching a pattern could not be listed (storage unreachable, no credentials)."""


class InvalidInput(PipelineError):
    """The input given cannot be used as it is."""


class PermanentError(PipelineError):
    """The file cannot be processed and retrying will not help."""


class DataError(PermanentError):
    """The database refused the data (a value too long, out of range or invalid): retrying
    the same data will not help."""


class FileDead(PipelineError):
    """The file is dead: its attempts are used up or its error is not retryable."""


class BatchCancelled(PipelineError):
    """The file's batch was cancelled: the file stopped at its last committed chunk."""


class FileBusy(PipelineError):
    """Another live execution holds the file's claim."""


class TransactionBroken(PipelineError):
    """The database broke the output transaction too often in one attempt; the attempt failed."""


class TimeLimitExceeded(PipelineError):
    """The function ran past its task's soft time limit; the attempt failed."""


def one_line(error: BaseException) -> str:
    """`Type: the message's first line` (the type alone for an empty message), 500 at most."""
    name = type(error).__name__
    text = f"{name}: {error}".splitlines()[0] if str(error) else name
    return text[:500]
