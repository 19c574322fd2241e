"""Value objects: Stats coercion, the derived counters, the status enum's shape."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from pipeline.models import Checkpoint, Claim, FailResult, Reason, Refusal, Stats, Status


def test_stats_coerce__none_is_all_zero() -> None:
    assert Stats.coerce(None) == Stats(0, 0, 0)


def test_stats_coerce__a_stats_is_returned_as_is() -> None:
    stats = Stats(3, 1, 2)
    assert Stats.coerce(stats) is stats


def test_stats_coerce__a_partial_dict_fills_the_rest_with_zero() -> None:
    assert Stats.coerce({"total": 5, "persisted": 4}) == Stats(5, 0, 4)


def test_stats_coerce__numeric_values_become_ints() -> None:
    coerced = Stats.coerce({"total": "7", "filtered": 2.0, "persisted": True})
    assert coerced == Stats(7, 2, 1)
    assert all(type(v) is int for v in coerced.as_dict().values())


def test_stats_coerce__unknown_keys_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match=r"unknown stats keys: \['rows'\]"):
        Stats.coerce({"total": 1, "rows": 2})


@pytest.mark.parametrize("value", [[1, 2, 3], 3, "total=1"])
def test_stats_coerce__other_types_are_refused(value: object) -> None:
    with pytest.raises(TypeError, match="stats must be a Stats or a dict"):
        Stats.coerce(value)  # type: ignore[arg-type]


def test_stats__is_frozen_and_round_trips_through_a_dict() -> None:
    stats = Stats(3, 1, 2)
    assert Stats.coerce(stats.as_dict()) == stats
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.total = 4  # type: ignore[misc]


def test_claim_and_refusal__truthiness_says_whether_granted() -> None:
    assert Claim("u", 1, 1, 3, 30.0, 1)
    assert not Refusal("u", Reason.BUSY, retry_in=3.0)


def test_fail_result__will_retry_only_when_failed() -> None:
    assert FailResult(Status.FAILED, 1, 3).will_retry
    assert not FailResult(Status.DEAD, 3, 3).will_retry


@pytest.mark.parametrize(("attempt", "retry_count"), [(0, 0), (1, 0), (2, 1), (3, 2)])
def test_checkpoint_retry_count__is_attempt_minus_one(attempt: int, retry_count: int) -> None:
    now = dt.datetime.now(dt.UTC)
    row = Checkpoint(
        file_url="u", file_type="t", status=Status.PENDING, attempt=attempt, max_attempts=3,
        generation=1, token=None, records_total=0, records_filtered=0, records_persisted=0,
        processing_time_ms=0, error_message=None, processed_by=None, task_name=None,
        task_id=None, batch_id=None, fingerprint=None, lease_expires_at=None, started_at=None,
        completed_at=None, created_at=now, updated_at=now,
    )  # fmt: skip
    assert row.retry_count == retry_count


def test_status__terminal_states_are_completed_and_dead() -> None:
    assert {s for s in Status if s.terminal} == {Status.COMPLETED, Status.DEAD}
