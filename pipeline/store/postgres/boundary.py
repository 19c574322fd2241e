"""The one error boundary: driver errors become the project's own, sorted by what they say
about the database (the README's table of error classes).

- away or out of resources (the server unreachable, shutting down or starting up, too many
  connections, disk full, out of memory, a serialization or deadlock retry): StoreUnavailable,
  with its `cause`; the execution waits in place, no attempt is spent;
- the configuration is wrong (authentication, unknown database, a startup parameter or
  protocol the server refuses at connect): StoreMisconfigured, naming PIPELINE_DATABASE_URL;
  waiting would never end, so nobody waits;
- the data is wrong (data exceptions, constraint violations, program limits): DataError, the
  file's failure;
- the schema is missing: SchemaMissing.

A failed connect carries no SQLSTATE in psycopg (the server's FATAL is only in the message),
so connect failures are sorted by the server's message.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import psycopg
from sqlalchemy import exc as sa_exc

from pipeline import errors, masking

# Causes of StoreUnavailable (its `cause`), as status, the metrics and the logs name them.
UNREACHABLE = errors.UNREACHABLE
SHUTTING_DOWN = errors.SHUTTING_DOWN
TOO_MANY_CONNECTIONS = errors.TOO_MANY_CONNECTIONS
DISK_FULL = errors.DISK_FULL
OUT_OF_MEMORY = errors.OUT_OF_MEMORY
OUT_OF_RESOURCES = errors.OUT_OF_RESOURCES
CONFLICT = errors.CONFLICT
MISCONFIGURED = errors.MISCONFIGURED

# SQLSTATE (prefix) -> cause: the database is away or out of resources. Longest prefix first.
_AWAY_SQLSTATES = (
    ("53100", DISK_FULL),
    ("53200", OUT_OF_MEMORY),
    ("53300", TOO_MANY_CONNECTIONS),
    ("53", OUT_OF_RESOURCES),
    ("57P01", SHUTTING_DOWN),  # admin shutdown
    ("57P02", SHUTTING_DOWN),  # crash shutdown
    ("57P03", SHUTTING_DOWN),  # cannot connect now
    ("40001", CONFLICT),
    ("40P01", CONFLICT),
    ("08", UNREACHABLE),
)
# Wrong configuration whatever the moment: authentication, unknown database.
_MISCONFIGURED_SQLSTATES = ("28", "3D000")
# Data exception, integrity constraint violation, program limit exceeded (e.g. "index row
# size exceeds maximum"): the data is at fault, not the database.
_DATA_SQLSTATES = ("22", "23", "54")
_MISSING_SQLSTATES = ("42P01", "42883")  # undefined table, undefined function

# A connect refused by the server (or a pooler in front of it), by its message: what a retry
# cannot fix, and what it can. Checked in this order; a connect failure matching neither is
# an outage (connection refused, timeout, reset).
_CONNECT_MISCONFIGURED = re.compile(
    r"password authentication failed|authentication failed|no password supplied"
    r"|role \"[^\"]*\" does not exist|no pg_hba\.conf entry|database \"[^\"]*\" does not exist"
    r"|permission denied for database|unsupported startup parameter|unrecognized configuration"
    r"|invalid value for parameter|protocol violation|invalid startup packet"
    r"|unsupported frontend protocol|no such (?:database|user)|does not support SSL"
    r"|SSL (?:is )?required|server certificate|invalid (?:connection option|sslmode|port)",
    re.IGNORECASE,
)
_CONNECT_AWAY = (
    (
        re.compile(r"too many (?:clients|connections)|connection slots are reserved", re.I),
        TOO_MANY_CONNECTIONS,
    ),
    (re.compile(r"No space left on device|disk full", re.I), DISK_FULL),
    (re.compile(r"out of memory", re.I), OUT_OF_MEMORY),
    (
        re.compile(r"starting up|shutting down|in recovery mode|not yet accepting", re.I),
        SHUTTING_DOWN,
    ),
)


@contextlib.contextmanager
def translate(url: str) -> Iterator[None]:
    """Turn driver errors into the project's own, at this one boundary, by SQLSTATE."""
    try:
        yield
    except (sa_exc.DBAPIError, psycopg.Error) as error:
        orig = error.orig if isinstance(error, sa_exc.DBAPIError) else error
        state = str(getattr(orig, "sqlstate", "") or "")
        shown = masking.mask_url(url)
        message = masking.scrub(_first_line(orig), url)
        if state.startswith(_MISCONFIGURED_SQLSTATES) or _refused_at_connect(orig, state):
            raise errors.StoreMisconfigured(
                f"PIPELINE_DATABASE_URL {shown} is refused by the database: {message}",
                url=shown,
                cause=MISCONFIGURED,
                sqlstate=state or None,
                detail=_server_said(message),
            ) from error
        cause = _unavailable_cause(error, orig, state)
        if cause is not None:
            raise errors.StoreUnavailable(
                f"checkpoint database {shown} {_said(cause)}: {message}",
                url=shown,
                cause=cause,
                detail=_server_said(message),
            ) from error
        if state.startswith(_DATA_SQLSTATES):
            raise errors.DataError(
                f"the database refused the data ({state}): {message}", sqlstate=state
            ) from error
        if state in _MISSING_SQLSTATES:
            raise errors.SchemaMissing(
                f"checkpoint schema missing in {shown}: run `pipeline db upgrade` ({message})"
            ) from error
        raise


def _server_said(message: str) -> str:
    """What the server (or the socket) said, without libpq's "connection to server at ...
    failed:" preamble: what `pipeline status` shows."""
    return message.rpartition(" failed: ")[2].strip() or message


def _said(cause: str) -> str:
    return "unreachable" if cause == UNREACHABLE else f"unavailable ({cause})"


def _refused_at_connect(orig: BaseException | None, state: str) -> bool:
    """A connect the server (or a pooler) refused for a reason a retry cannot fix."""
    if state:
        # A protocol violation on an open session is a broken connection (an outage).
        return False
    if isinstance(orig, psycopg.ProgrammingError):
        return True  # libpq refused the connection string itself
    return isinstance(orig, psycopg.OperationalError) and bool(
        _CONNECT_MISCONFIGURED.search(str(orig))
    )


def _unavailable_cause(error: BaseException, orig: BaseException | None, state: str) -> str | None:
    if state:
        return next((cause for prefix, cause in _AWAY_SQLSTATES if state.startswith(prefix)), None)
    # No SQLSTATE: the server never answered (connection refused, timeout, closed socket), or
    # refused the connect with a FATAL whose SQLSTATE psycopg does not keep.
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return UNREACHABLE
    if isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError):
        text = str(orig)
        found = (cause for pattern, cause in _CONNECT_AWAY if pattern.search(text))
        return next(found, UNREACHABLE)
    return None


def _first_line(error: BaseException | None) -> str:
    if error is None:
        return ""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(error).__name__


def unavailable(url: str, error: BaseException) -> bool:
    """Whether an exception (from a task's own use of a transaction) means the database
    could not be reached or is out of resources (wait, not an attempt)."""
    try:
        with translate(url):
            raise error
    except errors.StoreUnavailable:
        return True
    except BaseException:
        return False


def no_answer(url: str, seconds: float, name: str) -> errors.StoreUnavailable:
    """A store statement (`name`) ended by its deadline or the server's statement timeout:
    the database counts as away, as on a lost link."""
    shown = masking.mask_url(url)
    return errors.StoreUnavailable(
        f"checkpoint database {shown} unreachable: no answer within {seconds:g} s ({name})",
        url=shown,
    )
