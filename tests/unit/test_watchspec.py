"""Intervals and PIPELINE_WATCH entries: what is read, and what is refused with which reason."""

from __future__ import annotations

import re

import pytest

from pipeline import errors
from pipeline.sources import watchspec
from pipeline.sources.watchspec import WatchSpec


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0),
        ("30s", 30.0),
        (" 5m ", 300.0),
        ("1.5m", 90.0),
        ("1h30m", 5400.0),
        ("2d", 172800.0),
        ("1500ms", 1.5),
        ("1H", 3600.0),
    ],
)
def test_parse_interval__reads_units_and_sums(text: str, seconds: float) -> None:
    assert watchspec.parse_interval(text) == seconds


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("abc", "not a duration"),
        ("30x", "not a duration"),
        ("s", "not a duration"),
        ("5m junk", "not a duration"),
        ("-5s", "not a duration"),
        ("0", "out of range"),
        ("500ms", "out of range"),
        ("nan", "out of range"),
        ("inf", "out of range"),
        ("8d", "out of range"),
    ],
)
def test_parse_interval__refuses_with_the_reason(text: str, says: str) -> None:
    with pytest.raises(errors.InvalidInput, match=says):
        watchspec.parse_interval(text)


@pytest.mark.parametrize("seconds", [1.0, 1.5, 30.0, 90.0, 300.0, 5400.0, 86400.0])
def test_format_interval__reads_back_the_same(seconds: float) -> None:
    assert watchspec.parse_interval(watchspec.format_interval(seconds)) == seconds


def test_parse__entries_separated_by_semicolons_or_lines_with_options() -> None:
    specs = watchspec.parse(
        "s3://b/in/**/*.jsonl 30s; /data/my dir/*.csv 1m batch=csv task=t.load\n\n/x/*.gz 1h;"
    )
    assert specs == [
        WatchSpec("s3://b/in/**/*.jsonl", 30.0),
        WatchSpec("/data/my dir/*.csv", 60.0, batch_id="csv", task_name="t.load"),
        WatchSpec("/x/*.gz", 3600.0),
    ]


def test_parse__a_list_of_strings_and_dicts_from_a_config_module() -> None:
    specs = watchspec.parse(
        ["/a/*.csv 10s", {"pattern": "/b/*.csv", "every": 20, "batch": "b", "task": "t"}]
    )
    assert specs == [WatchSpec("/a/*.csv", 10.0), WatchSpec("/b/*.csv", 20.0, "b", "t")]


@pytest.mark.parametrize("empty", [None, "", "  ; \n", []])
def test_parse__nothing_to_watch(empty: object) -> None:
    assert watchspec.parse(empty) == []  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ("/a/*.csv", "entry 1 ('/a/*.csv'): expected `PATTERN EVERY"),
        ("/a/*.csv 10s; /b/*.csv soon", "entry 2 ('/b/*.csv soon'): interval 'soon' is not a"),
        ("/a/*.csv 10s batch=x batch=y", "batch= given twice"),
        ("/a/*.csv 0.1s", "out of range"),
        ("/a/*.csv 10s; /a/*.csv 20s", "pattern watched twice: /a/*.csv"),
        ("/a/*.csv 10s task=\u202eevil", "control character"),
        ([{"pattern": "/a"}], "expected keys pattern, every"),
        ([{"pattern": "/a", "every": "1m", "when": 1}], "unknown: when"),
        ([42], "expected a string or a dict, not int"),
    ],
)
def test_parse__refuses_naming_the_entry_and_the_reason(setting: object, says: str) -> None:
    with pytest.raises(errors.InvalidInput, match=re.escape(says)):
        watchspec.parse(setting)  # type: ignore[arg-type]


def test_parse__credentials_in_a_pattern_are_refused_and_never_repeated() -> None:
    with pytest.raises(errors.InvalidInput) as caught:
        watchspec.parse("s3://AKIA:Sup3rSecret@bucket/in/*.jsonl 30s")
    assert "credentials" in str(caught.value)
    assert "Sup3rSecret" not in str(caught.value)


def test_beat_entries__one_scan_task_per_pattern_expiring_after_its_interval() -> None:
    entries = watchspec.beat_entries(watchspec.parse("/a/*.csv 10s batch=a; /b/*.csv 1m"))
    assert entries == {
        "pipeline-watch /a/*.csv": {
            "task": "pipeline.watch_scan",
            "schedule": 10.0,
            "kwargs": {"pattern": "/a/*.csv", "batch_id": "a", "task_name": "pipeline.ingest"},
            "options": {"expires": 10.0},
        },
        "pipeline-watch /b/*.csv": {
            "task": "pipeline.watch_scan",
            "schedule": 60.0,
            "kwargs": {"pattern": "/b/*.csv", "batch_id": "watch", "task_name": "pipeline.ingest"},
            "options": {"expires": 60.0},
        },
    }
