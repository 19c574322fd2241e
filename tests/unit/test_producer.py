"""`producer.submit` over the in-memory store with a fake `send`: what is registered and sent."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import pytest

from pipeline import errors
from pipeline.models import Status
from pipeline.sources import producer
from pipeline.store.memory import MemoryStore
from tests.support.fakes import RecordingSend, complete, register_calls

TASK = "pipeline.ingest"


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def send() -> RecordingSend:
    return RecordingSend()


def lines(*items: str) -> producer.Source:
    return producer.from_lines(list(items), fingerprints=False)


def test_submit__registers_in_chunks_and_sends_one_task_per_url(
    store: MemoryStore, send: RecordingSend
) -> None:
    urls = [f"/data/f{i:02d}.jsonl" for i in range(10)]
    seen: list[int] = []

    report = producer.submit(
        store,
        lines(*urls),
        send,
        batch_id="b",
        chunk_size=3,
        progress=lambda r: seen.append(r.seen),
    )

    assert [len(call) for call in register_calls(store)] == [3, 3, 3, 1]
    assert seen == [3, 6, 9, 10]  # progress after every chunk
    assert send.calls == [(TASK, f"file://{u}") for u in urls]
    assert (report.seen, report.enqueued, report.refused_count) == (10, 10, 0)
    row = store.get("file:///data/f00.jsonl")
    assert row is not None
    assert (row.status, row.batch_id, row.task_name) == (Status.PENDING, "b", TASK)


def test_submit__no_input__no_register_call(store: MemoryStore, send: RecordingSend) -> None:
    report = producer.submit(store, lines(), send)

    assert register_calls(store) == []
    assert send.calls == []
    assert report == producer.SubmitReport()


def test_submit__refused_lines_reported_with_their_line_numbers(
    store: MemoryStore, send: RecordingSend
) -> None:
    report = producer.submit(
        store,
        lines(
            "/data/good1.jsonl",  # 1
            "",  # 2
            "nosuch://x",  # 3
            "/data/a\x01b.jsonl",  # 4
            "/" + "a" * 2100,  # 5
            "nosuch://[/x]",  # 6: a malformed bracketed host
            "/data/good2.jsonl\n",  # 7: the newline of a line read from a file
        ),
        send,
        chunk_size=4,
    )

    assert [(line, text) for line, text, _ in report.refused] == [
        (2, ""),
        (3, "nosuch://x"),
        (4, "/data/a\x01b.jsonl"),
        (5, ("/" + "a" * 2100)[:200]),  # the kept text is cut short
        (6, "nosuch://[/x]"),
    ]
    reasons = [reason for _, _, reason in report.refused]
    assert reasons[0] == "empty line"
    assert reasons[1] == "no fsspec filesystem serves scheme 'nosuch'"
    assert reasons[2].startswith("contains a control character (0x01)")
    assert reasons[3].startswith("longer than 2048 characters")
    assert reasons[4].startswith("not a valid URL")
    assert report.refused_count == 5
    assert send.urls == ["file:///data/good1.jsonl", "file:///data/good2.jsonl"]
    assert [u for call in register_calls(store) for u, _ in call] == send.urls


def test_submit__refusals_beyond_the_kept_ones_are_only_counted(
    store: MemoryStore, send: RecordingSend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(producer, "MAX_REFUSED_KEPT", 2)

    report = producer.submit(store, lines(*["nosuch://x"] * 5, "/data/ok.jsonl"), send)

    assert report.refused_count == 5
    assert [line for line, _, _ in report.refused] == [1, 2]
    assert send.urls == ["file:///data/ok.jsonl"]


def test_submit__duplicates_within_the_input_are_sent_once(
    store: MemoryStore, send: RecordingSend
) -> None:
    report = producer.submit(
        store,
        lines("/d/a.jsonl", "file:///d/a.jsonl", "/d/./x/../a.jsonl", "/d/b.jsonl", "/d/a.jsonl"),
        send,
    )

    assert send.urls == ["file:///d/a.jsonl", "file:///d/b.jsonl"]
    assert report.enqueued == 2
    assert report.seen == 5  # input items, before deduplication


def test_submit__duplicate_in_a_later_chunk_of_a_pending_row_is_sent_again(
    store: MemoryStore, send: RecordingSend
) -> None:
    # A pending row's message may have been lost; a duplicate costs only one claim.
    report = producer.submit(store, lines("/d/a.jsonl", "/d/a.jsonl"), send, chunk_size=1)

    assert send.urls == ["file:///d/a.jsonl", "file:///d/a.jsonl"]
    assert (report.enqueued, report.in_flight_before) == (2, 0)


def test_submit__completed_skipped_unless_forced(store: MemoryStore, send: RecordingSend) -> None:
    url = "file:///d/done.jsonl"
    producer.submit(store, lines(url), send)
    complete(store, url)
    send.calls.clear()

    plain = producer.submit(store, lines(url), send)
    assert send.calls == []
    assert (plain.enqueued, plain.completed_before) == (0, 1)

    forced = producer.submit(store, lines(url), send, force=True)
    assert send.calls == [(TASK, url)]
    assert (forced.enqueued, forced.completed_before) == (1, 0)
    row = store.get(url)
    assert row is not None
    assert (row.status, row.generation, row.attempt) == (Status.PENDING, 2, 0)


def test_submit__dead_file_counted_not_sent_even_with_force(
    store: MemoryStore, send: RecordingSend
) -> None:
    # Dead files go back through `requeue --dead`, which says so; --force is for completed.
    url = "file:///d/dead.jsonl"
    producer.submit(store, lines(url), send)
    store.mark(url, Status.DEAD, error="broken")
    send.calls.clear()

    report = producer.submit(store, lines(url), send, force=True)

    assert send.calls == []
    assert report.dead_before == 1


def test_submit__glob_fingerprints_detect_a_changed_file(
    store: MemoryStore, send: RecordingSend, tmp_path: pathlib.Path
) -> None:
    (tmp_path / "sub").mkdir()  # a directory the glob matches is not a file to process
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.csv"
    a.write_text("{}\n")
    b.write_text("id\n")
    pattern = f"{tmp_path}/*"

    first = producer.submit(store, producer.from_glob(pattern), send)
    assert send.urls == [a.as_uri(), b.as_uri()]
    assert first.enqueued == 2
    for path in (a, b):
        complete(store, path.as_uri())
    row = store.get(a.as_uri())
    assert row is not None
    assert row.fingerprint is not None
    assert row.fingerprint.startswith(f"{a.stat().st_size}:")

    send.calls.clear()
    same = producer.submit(store, producer.from_glob(pattern), send)
    assert send.calls == []
    assert same.completed_before == 2

    a.write_text('{"changed": true}\n')
    os.utime(a, (a.stat().st_atime, a.stat().st_mtime + 5))
    changed = producer.submit(store, producer.from_glob(pattern), send)
    assert send.urls == [a.as_uri()]
    assert (changed.enqueued, changed.completed_before) == (1, 1)
    row = store.get(a.as_uri())
    assert row is not None
    assert (row.status, row.generation) == (Status.PENDING, 2)


class _NoCredentials(Exception):
    """Stands for an SDK's own error (botocore's NoCredentialsError is not an OSError)."""


class _UnlistableFilesystem:
    def glob(self, path: str, detail: bool = False) -> dict[str, Any]:
        raise _NoCredentials("Unable to locate credentials\n  (a second line)")


def test_from_glob__a_listing_the_backend_refuses_is_one_line_naming_the_pattern(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        producer.urls, "filesystem", lambda pattern: (_UnlistableFilesystem(), "b/in/*.jsonl")
    )
    with pytest.raises(errors.ListingFailed) as caught:
        list(producer.from_glob("memory://b/in/*.jsonl"))
    assert str(caught.value) == (
        "could not list 'memory://b/in/*.jsonl': _NoCredentials: Unable to locate credentials"
    )
