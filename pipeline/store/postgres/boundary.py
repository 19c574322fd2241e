"""The one error boundary: driver errors become the project's own, by SQLSTATE."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg
from sqlalchemy import exc as sa_exc

from pipeline import errors, masking

# SQLSTATEs that mean "the server is not reachable or went away" (connection exception,
# admin/crash shutdown, cannot connect now) and "too many connections" (wait for a slot).
# Nothing else is an outage: a data error retried in a loop would never succeed.
_UNAVAILABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")
# Data exception, integrity constraint violation, program limit exceeded (e.g. "index row
# size exceeds maximum"): the data is at fault, not the database.
_DATA_SQLSTATES = ("22", "23", "54")
_MISSING_SQLSTATES = ("42P01", "42883")  # undefined table, undefined function


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
        if _is_unavailable(error, orig, state):
            raise errors.StoreUnavailable(
                f"checkpoint database {shown} unreachable: {message}", url=shown
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


def _is_unavailable(error: BaseException, orig: BaseException | None, state: str) -> bool:
    if state:
        return state.startswith(_UNAVAILABLE_SQLSTATES)
    # No SQLSTATE: the server never answered (connection refused, timeout, closed socket).
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError)


def _first_line(error: BaseException | None) -> str:
    return (str(error) or type(error).__name__).strip().splitlines()[0] if error else ""


def unavailable(url: str, error: BaseException) -> bool:
    """Whether an exception (from a task's own use of a transaction) means the database
    could not be reached."""
    try:
        with translate(url):
            raise error
    except errors.StoreUnavailable:
        return True
    except BaseException:
        return False
