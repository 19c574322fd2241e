"""The ingest's line parser against hostile files: nothing lost silently, nothing blocks."""

from __future__ import annotations

import os
import pathlib

import pytest

from pipeline.reference import formats, ingest


def tally(path: pathlib.Path) -> ingest.Tally:
    return ingest.Tally().add_all(formats.read_records(path.as_uri()))


def test_type_longer_than_the_index_allows__that_line_filtered_others_kept(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(
        '{"id": "1", "ts": "2024-01-01T00:00:00Z", "type": "ok"}\n'
        f'{{"id": "2", "ts": "2024-01-01T00:00:00Z", "type": "{"é" * 600}"}}\n'
        f'{{"id": "{"i" * 1001}", "ts": "2024-01-01T00:00:00Z", "type": "ok"}}\n'
    )
    t = tally(path)
    assert (t.total, t.filtered, t.candidates) == (3, 2, 1)
    assert t.examples == [
        "line 2: type longer than 1000 bytes (1200)",
        "line 3: id longer than 1000 bytes (1001)",
    ]


def test_csv_unclosed_quote__every_swallowed_line_is_counted_filtered(
    tmp_path: pathlib.Path,
) -> None:
    good = "{n},2024-01-01T00:00:00Z,view\n"
    path = tmp_path / "a.csv"
    path.write_text(
        "id,ts,type\n"
        + good.format(n=1)
        + '2,"2024\n'
        + "".join(good.format(n=n) for n in range(3, 101))
    )
    t = tally(path)
    # 100 data lines: one valid, then one row whose quote never closes and 98 lines inside it.
    assert (t.total, t.filtered, t.candidates) == (100, 99, 1)
    assert "row spans lines 3-101; unclosed quote?" in t.examples[0]


def test_csv_field_over_the_limit__every_line_after_it_is_counted(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "a.csv"
    path.write_text(
        "id,ts,type\n" + '2,"' + ("y" * 100_000 + "\n") * 3 + '",x\n' + "3,2024-01-01T00:00:00Z,a\n"
    )
    t = tally(path)
    # Lines 2-6 after the header: each one counted, valid or filtered, none silently gone.
    assert t.total == 5
    assert t.total == t.filtered + t.candidates
    assert "field larger than field limit" in t.examples[0]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_not_a_regular_file__refused_at_once_without_blocking(
    tmp_path: pathlib.Path, kind: str
) -> None:
    path = tmp_path / "x.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ingest.NotRegularFile, match="not a regular file"):
        tally(path)
    assert len(os.listdir("/proc/self/fd")) == fds
