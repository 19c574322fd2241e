"""The reference task resumes inside a file, run eagerly on the real Postgres store: each chunk
commits its events with its position, an attempt that breaks midway is followed by one that
starts at the last committed position, and every line lands once.

An attempt is broken by making the COPY's rows raise after a number of rows: the attempt
fails (its chunk rolls back) and, under `apply()`, Celery runs the retry at once.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline.models import Outcome, Status
from pipeline.reference import chunks, ingest
from pipeline.reference.task import ingest_file
from pipeline.store.postgres import PostgresStore


@pytest.fixture
def store(reference_store: PostgresStore) -> PostgresStore:
    return reference_store


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few lines (a chunk can only end at a block's end)."""
    from pipeline.sources import textfile

    monkeypatch.setattr(textfile, "READ_BYTES", 512)


class BreakOnce:
    """The COPY's rows raise after `after` rows, the first time only."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, after: int) -> None:
        self.after = after
        self.broken = False
        real = ingest.copy_rows

        def rows(file_url: str, records: Any, tally: Any) -> Iterator[tuple[Any, ...]]:
            for row in real(file_url, records, tally):
                self.after -= 1
                if self.after < 0 and not self.broken:
                    self.broken = True
                    raise ConnectionResetError("the worker went away mid-chunk")
                yield row

        monkeypatch.setattr(ingest, "copy_rows", rows)


def lines_of(store: PostgresStore, file_url: str) -> list[int]:
    with store.transaction() as tx:
        rows = tx.connection.exec_driver_sql(
            "SELECT line FROM events WHERE file_url = %(u)s ORDER BY line", {"u": file_url}
        )
        return [int(r[0]) for r in rows]


def event(n: int, text: str = "view") -> dict[str, Any]:
    return {"id": f"e{n}", "ts": "2024-03-01T10:00:00Z", "type": text}


def write_jsonl(path: pathlib.Path, count: int, text: str = "view") -> str:
    path.write_text("".join(json.dumps(event(n, text)) + "\n" for n in range(1, count + 1)))
    return path.as_uri()


def attempts(store: PostgresStore, file_url: str) -> list[Any]:
    row = store.get(file_url, with_attempts=True)
    assert row is not None
    return list(row.attempts)


def run_limits(monkeypatch: pytest.MonkeyPatch, records: int) -> None:
    """Chunks of `records` records, so small files have many."""
    real = chunks.pieces

    def limited(items: Any, start: Any, **kw: Any) -> Any:
        return real(items, start, records=records)

    monkeypatch.setattr(chunks, "pieces", limited)


@pytest.mark.usefixtures("small_blocks")
def test_chunks_run_in_process__send_no_progress_event(
    store: PostgresStore, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under apply() no worker's events are watched: a progress event would only wait on the
    broker (a minute of connection retries per chunk where none answers)."""
    sent: list[str] = []
    monkeypatch.setattr(ingest_file, "send_event", lambda kind, **_: sent.append(kind))
    run_limits(monkeypatch, 100)
    file_url = write_jsonl(tmp_path / "quiet.jsonl", 300)
    assert ingest_file.apply(args=[file_url]).successful()
    assert attempts(store, file_url)[0].chunks >= 3
    assert sent == []


@pytest.mark.usefixtures("small_blocks")
def test_chunks__each_commits_its_lines_and_the_history_shows_the_positions(
    store: PostgresStore, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_limits(monkeypatch, 100)
    file_url = write_jsonl(tmp_path / "a.jsonl", 1000)
    assert ingest_file.apply(args=[file_url]).successful()
    assert lines_of(store, file_url) == list(range(1, 1001))
    (only,) = attempts(store, file_url)
    assert only.outcome is Outcome.COMPLETED
    assert only.chunks >= 9
    assert only.end_position["line"] == 1000
    assert only.end_position["offset"] == os.path.getsize(tmp_path / "a.jsonl")


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_broken_attempt__the_next_starts_at_the_last_commit_and_each_line_lands_once(
    store: PostgresStore,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    compressed: bool,
) -> None:
    run_limits(monkeypatch, 100)
    plain = tmp_path / "b.jsonl"
    write_jsonl(plain, 1000)
    path = plain
    if compressed:
        path = tmp_path / "b.jsonl.gz"
        path.write_bytes(gzip.compress(plain.read_bytes()))
    file_url = path.as_uri()
    broken = BreakOnce(monkeypatch, after=550)
    assert ingest_file.apply(args=[file_url]).successful()
    assert broken.broken
    assert lines_of(store, file_url) == list(range(1, 1001))
    first, second = attempts(store, file_url)
    assert (first.outcome, second.outcome) == (Outcome.FAILED, Outcome.COMPLETED)
    # The second attempt started where the first one's last chunk ended (about line 500).
    assert first.end_position == second.start_position
    assert 400 <= second.start_position["line"] <= 550
    row = store.get(file_url)
    assert row is not None
    assert (row.status, row.attempts_spent, row.records_persisted) == (Status.COMPLETED, 0, 1000)


@pytest.mark.usefixtures("small_blocks")
def test_csv__resumes_with_its_header_and_a_row_spanning_lines_stays_whole(
    store: PostgresStore, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_limits(monkeypatch, 50)
    rows = ["id,ts,type,note"]
    for n in range(1, 401):
        note = f'"line one\nline two of {n}"' if n % 7 == 0 else f"n{n}"
        rows.append(f"e{n},2024-03-01T10:00:00Z,view,{note}")
    path = tmp_path / "c.csv"
    path.write_text("\n".join(rows) + "\n")
    file_url = path.as_uri()
    BreakOnce(monkeypatch, after=230)
    assert ingest_file.apply(args=[file_url]).successful()
    with store.transaction() as tx:
        got = tx.connection.exec_driver_sql(
            "SELECT event_id, payload->>'note' FROM events WHERE file_url = %(u)s", {"u": file_url}
        ).fetchall()
    assert sorted(int(e[1:]) for e, _ in got) == list(range(1, 401))
    notes = dict(got)
    assert notes["e7"] == "line one\nline two of 7"
    assert notes["e8"] == "n8"
    _, second = attempts(store, file_url)
    assert second.start_position["header"] == ["id", "ts", "type", "note"]


@pytest.mark.usefixtures("small_blocks")
def test_multibyte_text__resumed_midway_at_a_byte_offset_every_character_intact(
    store: PostgresStore, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_limits(monkeypatch, 100)
    text = "café ☕ 日本語 🚀"
    file_url = write_jsonl(tmp_path / "u.jsonl", 600, text)
    BreakOnce(monkeypatch, after=330)
    assert ingest_file.apply(args=[file_url]).successful()
    with store.transaction() as tx:
        got = tx.connection.exec_driver_sql(
            "SELECT line, type FROM events WHERE file_url = %(u)s ORDER BY line", {"u": file_url}
        ).fetchall()
    assert [line for line, _ in got] == list(range(1, 601))
    assert {t for _, t in got} == {text}
    _, second = attempts(store, file_url)
    # Bytes, not characters: the offset is past every multibyte character of the lines before.
    assert second.start_position["offset"] > second.start_position["line"] * len(text)


@pytest.mark.usefixtures("small_blocks")
def test_object_changed_between_attempts__a_new_generation_from_the_beginning(
    store: PostgresStore, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_limits(monkeypatch, 100)
    path = tmp_path / "d.jsonl"
    file_url = write_jsonl(path, 500, "old")

    real = ingest.copy_rows
    state = {"rows": 0}

    def rows(file_url: str, records: Any, tally: Any) -> Iterator[tuple[Any, ...]]:
        for row in real(file_url, records, tally):
            state["rows"] += 1
            if state["rows"] == 250:
                # Another writer replaces the file while the first attempt is in its third
                # chunk; the first attempt then breaks.
                write_jsonl(path, 300, "new")
                raise ConnectionResetError("the worker went away")
            yield row

    monkeypatch.setattr(ingest, "copy_rows", rows)
    assert ingest_file.apply(args=[file_url]).successful()
    with store.transaction() as tx:
        got = tx.connection.exec_driver_sql(
            "SELECT line, type FROM events WHERE file_url = %(u)s ORDER BY line", {"u": file_url}
        ).fetchall()
    # Only the new content, whole: no old line kept, none mixed in.
    assert got == [(n, "new") for n in range(1, 301)]
    row = store.get(file_url)
    assert row is not None
    assert (row.status, row.generation) == (Status.COMPLETED, 2)
