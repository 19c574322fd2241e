"""What the newcomer reads: the throughput line, the dead-files table, the live bar's rate."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io

import pytest
from rich.console import Console
from rich.progress import Progress

from pipeline.cli import display
from pipeline.cli.live import RateColumn
from pipeline.models import Stats, Status
from pipeline.views import DeadFile, Overview

POISON = "file:///home/someone/projects/pipeline/.pipeline/demo-data/part-0663-poison.jsonl"


def overview(
    counts: dict[Status, int],
    *,
    seconds: float | None,
    last_minute: int = 0,
    records: int = 0,
    dead: tuple[DeadFile, ...] = (),
) -> Overview:
    return Overview(
        counts={"b": counts},
        completed_last_minute=last_minute,
        oldest_live_lease_age=None,
        expired_leases=0,
        dead=dead,
        records=Stats(records, 0, records),
        batch_seconds=seconds,
    )


def test_throughput__finished_batch_reports_its_own_rate_over_its_running_time() -> None:
    done = overview(
        {Status.COMPLETED: 1999, Status.DEAD: 1}, seconds=11.0, last_minute=1999, records=77000
    )
    line = display.throughput_line(done, "b")
    assert line == "throughput: 2000 files in 11.0s (181.8 files/s, 7,000 records/s)"
    assert "last minute" not in line


def test_throughput__live_batch_keeps_the_last_minute_figure() -> None:
    live = overview({Status.COMPLETED: 100, Status.PENDING: 50}, seconds=20.0, last_minute=90)
    line = display.throughput_line(live, "b")
    assert line.startswith("throughput: 90 files completed in the last minute (1.5/s)"), line


def test_throughput__all_batches_keep_the_last_minute_figure() -> None:
    done = overview({Status.COMPLETED: 10}, seconds=None, last_minute=10)
    assert "in the last minute" in display.throughput_line(done, None)


@pytest.mark.parametrize("width", [24, 30, 40, 60])
def test_shorten_left__keeps_the_file_name_and_fits(width: int) -> None:
    short = display.shorten_left(POISON, width)
    assert len(short) <= width
    assert short.startswith("…")
    assert short.endswith("part-0663-poison.jsonl")


def test_shorten_left__short_text_unchanged() -> None:
    assert display.shorten_left("file:///a.jsonl", 40) == "file:///a.jsonl"


def test_dead_files_table__narrow_terminal_shows_the_name_cut_from_the_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(display, "out", Console(file=screen, width=80, color_system=None))
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    dead = (DeadFile(POISON, "binary content (NUL byte) on line 1", when, 1),)
    display.print_overview(overview({Status.DEAD: 1}, seconds=1.0, dead=dead), "b")
    text = screen.getvalue()
    assert "…/part-0663-poison.jsonl" in text, text
    assert "file:///home" not in text


def test_live_bar__shows_files_per_second_and_the_time_left() -> None:
    column = RateColumn()
    progress = Progress(console=Console(file=io.StringIO()), auto_refresh=False)
    tid = progress.add_task("b", total=300, rate=None)
    (task,) = progress.tasks
    assert str(column.render(task)) == "-- files/s, eta --:--"
    # 200 of 300 done at the batch's rate of 2.5 files/s: the 100 left take 40 s.
    progress.update(tid, completed=200, rate=2.5)
    assert str(column.render(task)) == "2.5 files/s, eta 0:40"
    progress.update(tid, completed=300)
    assert str(column.render(task)) == "2.5 files/s, eta 0:00"


def test_running__a_big_file_shows_its_records_bytes_percent_rate_and_eta() -> None:
    from pipeline.views import RunningFile

    big = RunningFile("file:///data/big.jsonl", 3, 1_500_000, 75 * 2**20, 100 * 2**20, seconds=30.0)
    live = dataclasses.replace(
        overview({Status.PROCESSING: 1}, seconds=None), running=(big,), records_in_flight=1_500_000
    )
    shown = display.overview_json(live)["running"][0]
    assert (shown["records"], shown["percent"], shown["records_per_second"]) == (
        1_500_000,
        75.0,
        50_000.0,
    )
    assert shown["eta_seconds"] == 10.0  # a quarter left at the rate so far
    assert display.records_so_far(live) == 1_500_000
    console = Console(file=io.StringIO(), width=160)
    console.print(display.running_table(live))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "1,500,000" in text
    assert "75.0 MiB of 100.0 MiB" in text
    assert "75%" in text
    assert "0:10" in text
