"""The reference task resumes an HTTP file, run eagerly on the real store against a local web
server: with a Range (If-Range pinned to the ETag) where the server answers ranges, by reading
and skipping where it does not, and from the beginning, as a new generation, when the file
changed between two attempts. fsspec's own seek over HTTP is not used: it once returned
wrong bytes silently on a server without ranges (filesystem_spec#1140)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline.models import Status
from pipeline.reference import chunks, ingest
from pipeline.reference.task import ingest_file
from pipeline.sources import textfile
from pipeline.store.postgres import PostgresStore
from tests.support.httpfiles import FileServer

LINES = 1000


@pytest.fixture
def store(reference_store: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> PostgresStore:
    # Blocks of a few lines, chunks of 100 records: a small file has many of each.
    monkeypatch.setattr(textfile, "READ_BYTES", 512)
    real = chunks.pieces
    monkeypatch.setattr(
        chunks, "pieces", lambda items, start, **kw: real(items, start, records=100)
    )
    return reference_store


@pytest.fixture
def server() -> Iterator[FileServer]:
    files = FileServer().start()
    yield files
    files.close()


def body(tag: str, count: int = LINES) -> bytes:
    rows = ({"id": f"{tag}{n}", "ts": "2024-03-01T10:00:00Z", "type": tag} for n in range(count))
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def break_once(monkeypatch: pytest.MonkeyPatch, after: int, then: Any = None) -> None:
    """The first attempt's COPY breaks after `after` rows (`then()` runs first)."""
    real = ingest.copy_rows
    state = {"rows": 0, "broken": False}

    def rows(file_url: str, records: Any, tally: Any) -> Iterator[tuple[Any, ...]]:
        for row in real(file_url, records, tally):
            state["rows"] += 1
            if state["rows"] > after and not state["broken"]:
                state["broken"] = True
                if then is not None:
                    then()
                raise ConnectionResetError("the worker went away")
            yield row

    monkeypatch.setattr(ingest, "copy_rows", rows)


def events(store: PostgresStore, file_url: str) -> list[tuple[int, str]]:
    with store.transaction() as tx:
        got = tx.connection.exec_driver_sql(
            "SELECT line, type FROM events WHERE file_url = %(u)s ORDER BY line", {"u": file_url}
        )
        return [(int(line), kind) for line, kind in got]


def second_start(store: PostgresStore, file_url: str) -> Any:
    row = store.get(file_url, with_attempts=True)
    assert row is not None
    assert len(row.attempts) == 2, row.attempts
    return row.attempts[1].start_position


def test_ranges__the_next_attempt_asks_for_the_rest_only(
    store: PostgresStore, server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    file_url = server.put("/r/a.jsonl", body("a"), etag='"v1"')
    break_once(monkeypatch, 550)
    assert ingest_file.apply(args=[file_url]).successful()
    assert events(store, file_url) == [(n, "a") for n in range(1, LINES + 1)]
    start = second_start(store, file_url)
    assert start["line"] >= 400
    assert f"bytes={start['offset']}-" in server.ranges
    assert ("GET", "/r/a.jsonl", 206) in server.log


def test_no_ranges__the_next_attempt_reads_the_file_again_and_skips_what_it_has(
    store: PostgresStore,
    server: FileServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    file_url = server.put("/r/b.jsonl", body("b"), etag='"v1"', ranges=False)
    break_once(monkeypatch, 550)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        assert ingest_file.apply(args=[file_url]).successful()
    assert events(store, file_url) == [(n, "b") for n in range(1, LINES + 1)]
    assert second_start(store, file_url)["line"] >= 400
    assert "reading and skipping" in caplog.text
    assert all(code == 200 for method, _, code in server.log if method == "GET")


def test_changed_between_attempts__starts_over_as_a_new_generation_never_mixing(
    store: PostgresStore, server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    file_url = server.put("/r/c.jsonl", body("old"), etag='"v1"')
    break_once(
        monkeypatch,
        550,
        then=lambda: server.put("/r/c.jsonl", body("new", 700), etag='"v2"'),
    )
    assert ingest_file.apply(args=[file_url]).successful()
    assert events(store, file_url) == [(n, "new") for n in range(1, 701)]
    row = store.get(file_url)
    assert row is not None
    assert (row.status, row.generation, row.records_persisted) == (Status.COMPLETED, 2, 700)
