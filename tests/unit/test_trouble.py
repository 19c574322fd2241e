"""Database trouble said once a minute per cause, remembered for `pipeline status`."""

from __future__ import annotations

import logging

import pytest

from pipeline import errors
from pipeline.worker.trouble import TroubleLog


def _full() -> errors.StoreUnavailable:
    return errors.StoreUnavailable(
        "checkpoint database x unavailable (disk full): could not extend file",
        cause=errors.DISK_FULL,
        detail="could not extend file: No space left on device",
    )


def test_one_line_a_minute_per_cause_however_many_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = TroubleLog(every=60)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        for _ in range(50):
            log.seen(_full(), "claiming a")
        for _ in range(3):
            log.seen(errors.StoreUnavailable("gone", cause=errors.UNREACHABLE), "claiming b")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("database disk full: claiming a: ")
    assert lines[1].startswith("database unreachable: claiming b: gone")


def test_the_next_line_after_the_minute_counts_the_unsaid_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = TroubleLog(every=0.0)  # every failure is past "the minute"
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        log.seen(_full(), "a")
        log.seen(_full(), "a")
    assert len(caplog.records) == 2
    quiet = TroubleLog(every=60)
    quiet.seen(_full(), "a")
    quiet.seen(_full(), "a")
    quiet.every = 0.0
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        quiet.seen(_full(), "a")
    assert caplog.records[-1].getMessage().endswith("(1 more like it in the last minute)")


def test_spells_are_kept_per_cause_with_what_the_server_said_and_reported_once() -> None:
    log = TroubleLog()
    log.seen(_full(), "a")
    log.seen(errors.StoreMisconfigured("PIPELINE_DATABASE_URL refused", cause="configuration"), "b")
    spells = {t.cause: t for t in log.take_unreported()}
    assert set(spells) == {"disk full", "configuration"}
    assert spells["disk full"].message == "could not extend file: No space left on device"
    assert log.take_unreported() == []
    log.put_back(list(spells.values()))
    assert {t.cause for t in log.take_unreported()} == {"disk full", "configuration"}
