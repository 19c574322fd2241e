"""The reference task `pipeline.ingest`, run eagerly in this process on the real Postgres store.

Each test applies the Celery task itself (`ingest_file.apply`), so the claim, the output
transaction, the completion and the failure paths are the ones a worker runs; only the
broker is absent.
"""

from __future__ import annotations

import gzip
import json
import pathlib
from typing import Any

import pytest
from celery.exceptions import Retry

from pipeline import errors
from pipeline.models import Status
from pipeline.reference.task import ingest_file
from pipeline.store.postgres import PostgresStore


@pytest.fixture
def store(reference_store: PostgresStore) -> PostgresStore:
    """The test store as the task's store, on empty checkpoint and events tables."""
    return reference_store


def url(path: pathlib.Path) -> str:
    return path.as_uri()


def event(n: int, **extra: Any) -> dict[str, Any]:
    return {"id": f"e{n}", "ts": f"2024-03-01T10:00:{n % 60:02d}Z", "type": "view", **extra}


def jsonl(*rows: dict[str, Any] | str) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def events(store: PostgresStore, file_url: str) -> list[tuple[Any, ...]]:
    with store.transaction() as tx:
        rows = tx.connection.exec_driver_sql(
            "SELECT line, event_id, type, ts, payload FROM events WHERE file_url = %(u)s"
            " ORDER BY line",
            {"u": file_url},
        )
        return [tuple(r) for r in rows]


def details(store: PostgresStore, file_url: str) -> Any:
    return store.scalar("SELECT details FROM file_checkpoints WHERE file_url = :u", {"u": file_url})


def stats_of(store: PostgresStore, file_url: str) -> tuple[str, int, int, int, int]:
    row = store.get(file_url)
    assert row is not None
    return (
        str(row.status),
        row.attempt,
        row.records_total,
        row.records_filtered,
        row.records_persisted,
    )


def test_jsonl__valid_records_persisted_with_their_payload(
    store: PostgresStore, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl(event(1, user="u1", amount=1.5), event(2), event(3, nested={"k": [1]})))

    result = ingest_file.apply(args=[url(path)])

    assert result.successful(), result.traceback
    assert result.result == {
        "file_url": url(path),
        "attempt": 1,
        "total": 3,
        "filtered": 0,
        "persisted": 3,
    }
    assert stats_of(store, url(path)) == ("completed", 1, 3, 0, 3)
    rows = events(store, url(path))
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (1, "e1", "view"),
        (2, "e2", "view"),
        (3, "e3", "view"),
    ]
    assert rows[0][3].isoformat() == "2024-03-01T10:00:01+00:00"
    assert [r[4] for r in rows] == [{"user": "u1", "amount": 1.5}, {}, {"nested": {"k": [1]}}]
    assert details(store, url(path)) is None  # no problems to report


def test_csv__rows_on_their_physical_lines(store: PostgresStore, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "b.csv"
    path.write_text(
        "id,ts,type,user\n"
        "c1,2024-03-01T10:00:00Z,click,alice\n"
        "c2,2024-03-01T11:00:00+01:00,view,bob\n"
    )

    result = ingest_file.apply(args=[url(path)])

    assert result.successful(), result.traceback
    assert stats_of(store, url(path)) == ("completed", 1, 2, 0, 2)
    rows = events(store, url(path))
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
        (2, "c1", "click", {"user": "alice"}),
        (3, "c2", "view", {"user": "bob"}),
    ]
    assert rows[1][3] == rows[0][3]  # 11:00+01:00 is 10:00Z


def test_gzipped_jsonl(store: PostgresStore, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl(event(1), event(2))))

    result = ingest_file.apply(args=[url(path)])

    assert result.successful(), result.traceback
    assert stats_of(store, url(path)) == ("completed", 1, 2, 0, 2)
    assert [r[1] for r in events(store, url(path))] == ["e1", "e2"]


def test_empty_file__completed_with_zero_records(
    store: PostgresStore, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")

    result = ingest_file.apply(args=[url(path)])

    assert result.successful(), result.traceback
    assert result.result["total"] == 0
    assert stats_of(store, url(path)) == ("completed", 1, 0, 0, 0)
    assert events(store, url(path)) == []


def test_malformed_lines__filtered_counted_and_described_on_the_row(
    store: PostgresStore, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        jsonl(
            event(1),
            '{"id": "x", "ts": ',  # 2: cut off
            {"id": "e3", "type": "view"},  # 3: no ts
            "[1, 2]",  # 4: not an object
            event(5),
            {"id": "e6", "ts": "yesterday", "type": "view"},  # 6
            "",  # 7: blank, not a record
            {"id": "e8", "ts": "2024-03-01T10:00:00Z", "type": 7},  # 8
        )
    )

    result = ingest_file.apply(args=[url(path)])

    assert result.successful(), result.traceback
    assert stats_of(store, url(path)) == ("completed", 1, 7, 5, 2)
    assert [r[0] for r in events(store, url(path))] == [1, 5]
    problems = details(store, url(path))["problems"]
    assert problems[0].startswith("line 2: not valid JSON")
    assert problems[1:] == [
        "line 3: missing ts",
        "line 4: not a JSON object",
        "line 6: ts not ISO 8601",
        "line 8: type is not a string",
    ]


def test_not_utf8__dead_at_once_without_retry_and_nothing_written(
    store: PostgresStore, tmp_path: pathlib.Path
) -> None:
    # Valid lines first; they share the bad byte's 1 MiB block, which is refused before any
    # of its rows is sent (a bad line past the first block: ..._bad_halfway_... below).
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(jsonl(*(event(n) for n in range(1, 601))) + b'{"id": "caf\xe9"}\n')

    result = ingest_file.apply(args=[url(path)])

    assert result.failed()
    assert isinstance(result.result, errors.FileDead)
    row = store.get(url(path), with_attempts=True)
    assert row is not None
    assert (row.status, row.attempt) == (Status.DEAD, 1)
    assert "not UTF-8 text: byte 0xe9 on line 601" in (row.error_message or "")
    assert [(a.outcome, a.error_class) for a in row.attempts] == [("failed", "BadContent")]
    assert events(store, url(path)) == []


@pytest.fixture
def one_attempt_per_apply(monkeypatch: pytest.MonkeyPatch) -> list[float | None]:
    """Make a retry end the eager run, so that each `apply` is one attempt.

    Celery's eager `apply` runs a retry's signature at once, recursively; a Retry without a
    signature ends the run in state RETRY instead. Returns the countdowns asked for.
    """
    countdowns: list[float | None] = []

    def retry(
        *, exc: BaseException | None = None, countdown: float | None = None, **_: Any
    ) -> Retry:
        countdowns.append(countdown)
        return Retry(exc=exc, when=countdown)

    monkeypatch.setattr(ingest_file, "retry", retry)
    return countdowns


def test_missing_file__retried_then_dead_after_three_attempts(
    store: PostgresStore, tmp_path: pathlib.Path, one_attempt_per_apply: list[float | None]
) -> None:
    file_url = url(tmp_path / "gone.jsonl")

    for attempt in (1, 2):
        result = ingest_file.apply(args=[file_url])
        assert result.state == "RETRY"
        row = store.get(file_url, with_attempts=True)
        assert row is not None
        assert (row.status, row.attempt) == (Status.FAILED, attempt)
        assert "No such file or directory" in (row.error_message or "")
        assert row.attempts[-1].error_class == "FileNotFoundError"
        assert len(one_attempt_per_apply) == attempt
        assert (one_attempt_per_apply[-1] or 0) > 0  # backs off before the next attempt

    result = ingest_file.apply(args=[file_url])

    assert result.failed()
    assert isinstance(result.result, errors.FileDead)
    assert "after attempt 3 of 3" in str(result.result)
    row = store.get(file_url, with_attempts=True)
    assert row is not None
    assert (row.status, row.attempt) == (Status.DEAD, 3)
    assert [a.error_class for a in row.attempts] == ["FileNotFoundError"] * 3
    assert len(one_attempt_per_apply) == 2  # no retry is asked for once it is dead


def test_missing_file__one_eager_apply_runs_every_attempt(
    store: PostgresStore, tmp_path: pathlib.Path
) -> None:
    # Celery's eager mode follows each retry at once, so one apply ends the story.
    file_url = url(tmp_path / "gone.jsonl")

    result = ingest_file.apply(args=[file_url])

    assert isinstance(result.result, errors.FileDead)
    row = store.get(file_url, with_attempts=True)
    assert row is not None
    assert (row.status, row.attempt, len(row.attempts)) == (Status.DEAD, 3, 3)


def test_completed_file_again__skipped_and_no_new_events(
    store: PostgresStore, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "once.jsonl"
    path.write_bytes(jsonl(event(1), event(2)))
    assert ingest_file.apply(args=[url(path)]).successful()
    first = events(store, url(path))

    again = ingest_file.apply(args=[url(path)])

    assert again.successful(), again.traceback
    assert again.result == {
        "file_url": url(path),
        "skipped": True,
        "reason": "already completed",
        "stats": {"total": 2, "filtered": 0, "persisted": 2},
    }
    assert events(store, url(path)) == first
    row = store.get(url(path), with_attempts=True)
    assert row is not None
    assert (row.attempt, len(row.attempts)) == (1, 1)


def test_rerun_in_a_new_generation__events_are_the_new_content(
    store: PostgresStore, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "changes.jsonl"
    path.write_bytes(jsonl(event(1), event(2), event(3)))
    assert ingest_file.apply(args=[url(path)]).successful()
    path.write_bytes(jsonl({**event(1), "id": "new1"}))
    assert [w.file_url for w in store.requeue(url(path), force=True)] == [url(path)]

    result = ingest_file.apply(args=[url(path)])

    assert result.successful(), result.traceback
    assert stats_of(store, url(path)) == ("completed", 1, 1, 0, 1)
    assert [(r[0], r[1]) for r in events(store, url(path))] == [(1, "new1")]


def test_new_generation_bad_halfway__copy_rolled_back_with_the_delete(
    store: PostgresStore, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "halfway.jsonl"
    path.write_bytes(jsonl(event(1), event(2)))
    assert ingest_file.apply(args=[url(path)]).successful()
    old = events(store, url(path))
    # Past the first 1 MiB read: the COPY has sent rows (and the DELETE ran) when the NUL comes.
    good = jsonl(*({**event(n), "id": f"new{n}"} for n in range(1, 40_001)))
    assert len(good) > 2 * 2**20
    path.write_bytes(good + b'{"id": "x\x00"}\n' + jsonl(event(9)))
    assert [w.file_url for w in store.requeue(url(path), force=True)] == [url(path)]

    result = ingest_file.apply(args=[url(path)])

    assert result.failed()
    row = store.get(url(path))
    assert row is not None
    assert (row.status, row.attempt) == (Status.DEAD, 1)
    assert "binary content (NUL byte) on line 40001" in (row.error_message or "")
    # Neither the new rows nor the deletion of the old ones were committed.
    assert events(store, url(path)) == old


def test_new_generation__replaces_every_old_line_under_the_unique_key(
    store: PostgresStore, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "grow.jsonl"
    path.write_bytes(jsonl(*(event(n) for n in range(1, 4))))
    assert ingest_file.apply(args=[url(path)]).successful()
    path.write_bytes(jsonl(*({**event(n), "id": f"v2-{n}"} for n in range(1, 6))))
    store.requeue(url(path), force=True)

    assert ingest_file.apply(args=[url(path)]).successful()

    assert [(r[0], r[1]) for r in events(store, url(path))] == [(n, f"v2-{n}") for n in range(1, 6)]
    total = store.scalar("SELECT count(*) FROM events WHERE file_url = :u", {"u": url(path)})
    assert total == 5


HOSTILE = "tab\there, newline\nthere, cr\r, backslash \\ and \\N, \\.\u2028 Zürich 🦆 \x7f"


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_copy__tabs_newlines_backslashes_and_unicode_round_trip_exactly(
    store: PostgresStore, tmp_path: pathlib.Path, suffix: str
) -> None:
    path = tmp_path / f"hostile{suffix}"
    if suffix == ".jsonl":
        rows = [
            {"id": HOSTILE, "ts": "2024-03-01T10:00:00Z", "type": "\\N", HOSTILE: [HOSTILE]},
            {"id": "\\", "ts": "2024-03-01T10:00:00Z", "type": "t\t", "k": {"\\": "\t\n"}},
        ]
        path.write_bytes(
            "".join(
                json.dumps(r, ensure_ascii=a) + "\n" for r in rows for a in (True, False)
            ).encode()
        )
        expected = [
            (r["id"], r["type"], {k: v for k, v in r.items() if k not in "id ts type"})
            for r in rows
            for _ in (1, 2)
        ]
    else:
        import csv
        import io

        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(
            [["id", "ts", "type", "note"], [HOSTILE, "2024-03-01T10:00:00Z", "\\N", HOSTILE]]
        )
        path.write_text(out.getvalue())
        expected = [(HOSTILE, "\\N", {"note": HOSTILE})]

    assert ingest_file.apply(args=[url(path)]).successful()

    assert [(r[1], r[2], r[4]) for r in events(store, url(path))] == expected
