"""The Python enums and the database's check constraints list the same values."""

from __future__ import annotations

import re

import pytest

from pipeline.models import Outcome, Status
from pipeline.store.postgres import PostgresStore

_CONSTRAINT = "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = :name"


# A check that calls a function of ours (migration 0015: cheaper to re-read per statement).
_FUNCTION = re.compile(r"CHECK \(\(?(pipeline_\w+)\(")
_SOURCE = "SELECT prosrc FROM pg_proc WHERE proname = :name"


def _allowed(store: PostgresStore, constraint: str) -> set[str]:
    """The values the constraint lets through: the quoted ones of its definition, or of the
    body of the function it calls."""
    definition = store.scalar(_CONSTRAINT, {"name": constraint})
    assert definition, f"constraint {constraint} not found"
    called = _FUNCTION.search(definition)
    if called:
        source = store.scalar(_SOURCE, {"name": called.group(1)})
        assert source, f"function {called.group(1)} not found"
        return set(re.findall(r"'([^']*)'", source))
    return set(re.findall(r"'([^']*)'::text", definition))


def test_status__values_equal_the_database_check_constraint(pg_store: PostgresStore) -> None:
    assert _allowed(pg_store, "file_checkpoints_status_check") == {s.value for s in Status}


def test_outcome__values_equal_the_attempts_check_constraint(pg_store: PostgresStore) -> None:
    assert _allowed(pg_store, "file_attempts_outcome_check") == {o.value for o in Outcome}


def test_status__a_value_outside_the_enum_is_refused_by_the_database(
    pg_store: PostgresStore,
) -> None:
    from pipeline import errors

    pg_store.register(["file:///data/a.csv"])
    # A check violation (SQLSTATE 23514) is the data's fault: DataError, not an outage.
    with pytest.raises(errors.DataError, match="file_checkpoints_status_check"):
        pg_store.scalar(
            "UPDATE file_checkpoints SET status = 'paused' WHERE file_url = :u RETURNING 1",
            {"u": "file:///data/a.csv"},
        )
