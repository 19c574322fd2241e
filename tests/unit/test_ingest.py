"""The reference task's reading and validation, and the sample-data generator."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import pathlib
import uuid
from collections.abc import Iterator

import fsspec
import pytest

from pipeline.models import Stats
from pipeline.reference import formats, ingest, sample
from pipeline.reference.formats import UnsupportedFormat
from pipeline.reference.ingest import BadContent, Record, Tally
from pipeline.sources import textfile, urls

GOOD = {"id": "e1", "ts": "2024-05-01T12:00:00Z", "type": "click", "user": "u1", "n": 3}
UTC = dt.UTC


def jsonl(*rows: object) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def write(path: pathlib.Path, text: str | bytes) -> str:
    """Write the file and return its normalised URL."""
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return urls.normalize(str(path))


def read(url: str) -> list[Record]:
    return list(formats.read_records(url))


def problems(records: list[Record]) -> list[tuple[int, str | None]]:
    return [(r.line, r.problem) for r in records if not r.ok]


@pytest.fixture
def memory_dir() -> Iterator[str]:
    """A private folder on fsspec's process-wide memory filesystem, removed after the test."""
    root = f"/ingest-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    fs.mkdir(root)
    yield root
    fs.rm(root, recursive=True)


# -- formats ---------------------------------------------------------------------------------


def test_read_records__jsonl_yields_events_with_payload(tmp_path: pathlib.Path) -> None:
    url = write(tmp_path / "a b.jsonl", jsonl(GOOD, {**GOOD, "id": "e2", "ts": "2024-05-01"}))
    records = read(url)
    assert [r.line for r in records] == [1, 2]
    first = records[0].event
    assert first is not None
    assert first.id == "e1"
    assert first.ts == dt.datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert first.type == "click"
    assert first.payload == {"user": "u1", "n": 3}
    assert records[1].event is not None
    assert records[1].event.ts == dt.datetime(2024, 5, 1, tzinfo=UTC)


@pytest.mark.parametrize("name", ["x.ndjson", "x.json", "X.JSONL"])
def test_read_records__json_lines_extensions(tmp_path: pathlib.Path, name: str) -> None:
    assert [r.ok for r in read(write(tmp_path / name, jsonl(GOOD)))] == [True]


def test_read_records__csv_counts_the_header_as_line_1(tmp_path: pathlib.Path) -> None:
    text = 'id,ts,type,note\ne1,2024-05-01T12:00:00+02:00,click,"two\nlines"\ne2,bad,view,x\n'
    records = read(write(tmp_path / "a.csv", text))
    assert [r.line for r in records] == [2, 4]
    event = records[0].event
    assert event is not None
    assert event.ts == dt.datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert event.payload == {"note": "two\nlines"}
    assert records[1].problem == "ts not ISO 8601"


def test_read_records__csv_field_count_and_blank_lines(tmp_path: pathlib.Path) -> None:
    text = "\ufeffid,ts,type\r\ne1,2024-05-01,click\r\n\r\ne2,2024-05-01\r\ne3,2024-05-01,a,b\r\n"
    records = read(write(tmp_path / "a.csv", text))
    assert records[0].ok  # the byte order mark is not part of the "id" column name
    assert problems(records) == [(4, "2 fields, header has 3"), (5, "4 fields, header has 3")]


def test_read_records__gzip_is_decompressed(tmp_path: pathlib.Path) -> None:
    url = write(tmp_path / "a.jsonl.gz", gzip.compress(jsonl(GOOD, "{oops").encode()))
    records = read(url)
    assert [r.ok for r in records] == [True, False]


def test_read_records__gzipped_csv(tmp_path: pathlib.Path) -> None:
    url = write(tmp_path / "a.csv.gz", gzip.compress(b"id,ts,type\ne1,2024-05-01,click\n"))
    assert [r.line for r in read(url) if r.ok] == [2]


def test_read_records__memory_url(memory_dir: str) -> None:
    fsspec.filesystem("memory").pipe(f"{memory_dir}/a.jsonl", jsonl(GOOD).encode())
    url = urls.normalize(f"memory://{memory_dir}/a.jsonl")
    assert [r.ok for r in read(url)] == [True]


def test_read_records__empty_file_has_no_records(tmp_path: pathlib.Path) -> None:
    assert read(write(tmp_path / "a.jsonl", "")) == []
    assert read(write(tmp_path / "b.csv", "")) == []
    assert read(write(tmp_path / "c.csv", "id,ts,type\n")) == []
    assert read(write(tmp_path / "d.jsonl.gz", gzip.compress(b""))) == []


def test_read_records__blank_jsonl_lines_are_skipped_but_keep_numbering(
    tmp_path: pathlib.Path,
) -> None:
    records = read(write(tmp_path / "a.jsonl", "\n" + jsonl(GOOD) + "  \n\n" + jsonl(GOOD)))
    assert [r.line for r in records] == [2, 5]


def test_read_records__last_line_without_newline(tmp_path: pathlib.Path) -> None:
    assert [r.line for r in read(write(tmp_path / "a.jsonl", jsonl(GOOD) + json.dumps(GOOD)))] == [
        1,
        2,
    ]


# -- malformed lines -------------------------------------------------------------------------


def test_read_records__malformed_json_does_not_stop_the_file(tmp_path: pathlib.Path) -> None:
    text = jsonl(GOOD, "{not json", "[1, 2]", '"text"', '{"id": "x", "ts": NaN, "type": "t"}', GOOD)
    records = read(write(tmp_path / "a.jsonl", text))
    assert [r.ok for r in records] == [True, False, False, False, False, True]
    assert records[1].problem is not None
    assert records[1].problem.startswith("not valid JSON")
    assert records[1].describe().startswith("line 2: not valid JSON")
    assert records[2].problem == "not a JSON object"
    assert records[3].problem == "not a JSON object"
    assert records[4].problem == "not valid JSON: NaN and Infinity are not allowed"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"id": None}, "missing id"),
        ({"id": ""}, "missing id"),
        ({"id": "  "}, "missing id"),
        ({"id": 7}, "id is not a string"),
        ({"ts": None}, "missing ts"),
        ({"ts": ""}, "missing ts"),
        ({"ts": " "}, "missing ts"),
        ({"id": 7, "ts": ""}, "id is not a string"),
        ({"id": "x" * 1001}, "id longer than 1000 bytes (1001)"),
        ({"type": "é" * 501}, "type longer than 1000 bytes (1002)"),
        ({"ts": "yesterday"}, "ts not ISO 8601"),
        ({"ts": "2024-13-01"}, "ts not ISO 8601"),
        ({"ts": 1714564800}, "ts is not a string"),
        ({"type": None}, "missing type"),
        ({"type": ""}, "missing type"),
        ({"type": ["click"]}, "type is not a string"),
        ({"note": "a\u0000b"}, "contains a NUL character (\\u0000)"),
        ({"id": "a\ud800"}, "contains an unpaired surrogate"),
        ({"deep": {"n": [1e400]}}, "number out of range"),
    ],
)
def test_read_records__invalid_records(
    tmp_path: pathlib.Path, change: dict[str, object], problem: str
) -> None:
    row = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    # json.dumps would write 1e400 as Infinity; spell it as a number the way a producer might.
    text = json.dumps(row).replace("Infinity", "1e400")
    assert problems(read(write(tmp_path / "a.jsonl", text + "\n"))) == [(1, problem)]


@pytest.mark.parametrize("value", ["x" * 1000, "é" * 500, "€" * 333])
def test_read_records__id_and_type_up_to_the_byte_limit_are_kept(
    tmp_path: pathlib.Path, value: str
) -> None:
    row = {**GOOD, "id": value, "type": value}
    (record,) = read(write(tmp_path / "a.jsonl", json.dumps(row, ensure_ascii=False) + "\n"))
    assert record.event is not None
    assert (record.event.id, record.event.type) == (value, value)


def test_read_records__deep_nesting_is_a_problem_not_a_crash(tmp_path: pathlib.Path) -> None:
    records = read(write(tmp_path / "a.jsonl", "[" * 100_000 + "\n" + jsonl(GOOD)))
    assert problems(records) == [(1, "not valid JSON: nested too deeply")]
    assert records[1].ok


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2024-05-01T12:00:00Z", dt.datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00z", dt.datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01 12:00:00", dt.datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T14:00:00+02:00", dt.datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00.123456Z", dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)),
        ("not a time", None),
        ("", None),
    ],
)
def test_parse_ts__aware_and_naive_as_utc(ts: str, expected: dt.datetime | None) -> None:
    parsed = ingest.parse_ts(ts)
    assert parsed == expected
    if parsed is not None:
        assert parsed.tzinfo is not None


# -- whole-file refusals ---------------------------------------------------------------------


def test_read_records__non_utf8_is_bad_content(tmp_path: pathlib.Path) -> None:
    url = write(tmp_path / "a.jsonl", jsonl(GOOD).encode() + '{"id": "é"}\n'.encode("latin-1"))
    with pytest.raises(BadContent, match="not UTF-8 text: byte 0xe9 on line 2") as caught:
        read(url)
    assert caught.value.data == {"url": url, "line": 2}


def test_read_records__binary_is_bad_content(tmp_path: pathlib.Path) -> None:
    url = write(tmp_path / "a.csv", b"id,ts,type\n\x89PNG\x00\x00\n")
    with pytest.raises(BadContent, match="NUL byte"):
        read(url)


def test_read_records__utf16_is_bad_content(tmp_path: pathlib.Path) -> None:
    url = write(tmp_path / "a.jsonl", jsonl(GOOD).encode("utf-16"))
    with pytest.raises(BadContent):
        read(url)


def test_read_records__broken_gzip_is_bad_content(tmp_path: pathlib.Path) -> None:
    with pytest.raises(BadContent, match="not a valid gzip file"):
        read(write(tmp_path / "a.jsonl.gz", jsonl(GOOD)))
    truncated = gzip.compress(jsonl(GOOD, GOOD, GOOD).encode())[:-10]
    with pytest.raises(BadContent, match="not a valid gzip file"):
        read(write(tmp_path / "b.jsonl.gz", truncated))


def test_read_records__endless_line_is_bad_content(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reading moved to pipeline.sources.textfile (ingest re-exports MAX_LINE_BYTES, read-only).
    monkeypatch.setattr(textfile, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(textfile, "READ_BYTES", 256)
    url = write(tmp_path / "a.jsonl", jsonl(GOOD) + "x" * 5000)
    with pytest.raises(BadContent, match="line 2 is longer than"):
        read(url)


def test_bad_input__is_a_pipeline_error_and_not_retryable() -> None:
    from pipeline.errors import PermanentError, PipelineError

    assert issubclass(BadContent, PipelineError)
    assert issubclass(BadContent, PermanentError)
    assert issubclass(BadContent, ingest.NON_RETRYABLE)
    assert issubclass(UnsupportedFormat, ingest.NON_RETRYABLE)
    assert not issubclass(FileNotFoundError, ingest.NON_RETRYABLE)
    assert str(BadContent()).startswith("The file is not UTF-8 text")


def test_read_records__missing_file_raises_file_not_found(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError):
        read(urls.normalize(str(tmp_path / "nope.jsonl")))
    with pytest.raises(FileNotFoundError):
        read("memory:///no-such-folder/nope.jsonl")


@pytest.mark.parametrize("name", ["a.txt", "a.parquet", "a.gz", "a", "a.jsonl.bz2"])
def test_read_records__unknown_extension_is_refused_before_reading(name: str) -> None:
    # The file does not exist: the format is refused first, when read_records is called.
    with pytest.raises(UnsupportedFormat, match="unsupported file extension"):
        formats.read_records(f"file:///nowhere/{name}")


def test_read_records__extension_ignores_query_string() -> None:
    assert formats.file_format("https://h/a.csv?sig=x.y") == ("csv", None)
    assert formats.file_format("file:///srv/a%20b.JSONL.GZ") == ("jsonl", "gzip")


# -- tally and insert parameters ---------------------------------------------------------------


def test_tally__counts_and_keeps_five_examples(tmp_path: pathlib.Path) -> None:
    rows = [GOOD] + ["{bad"] * 7 + [GOOD]
    tally = Tally().add_all(read(write(tmp_path / "a.jsonl", jsonl(*rows))))
    assert (tally.total, tally.filtered, tally.candidates) == (9, 7, 2)
    assert len(tally.examples) == ingest.MAX_EXAMPLES
    assert tally.examples[0].startswith("line 2: not valid JSON")
    assert tally.stats() == Stats(total=9, filtered=7, persisted=2)
    assert tally.stats(persisted=1) == Stats(total=9, filtered=7, persisted=1)
    assert tally.details() == {"problems": tally.examples}


def test_copy_rows__match_the_copy_columns_and_count_every_record(
    tmp_path: pathlib.Path,
) -> None:
    url = write(tmp_path / "a.jsonl", jsonl({**GOOD, "city": "Zürich"}, "{bad", GOOD))
    tally = Tally()
    rows = list(ingest.copy_rows(url, formats.read_records(url), tally))
    columns = ingest.COPY_EVENTS_SQL.split("(", 1)[1].split(")", 1)[0].split(", ")
    assert columns == ["file_url", "line", "event_id", "ts", "type", "payload"]
    assert [len(row) for row in rows] == [6, 6]
    file_url, line, event_id, ts, kind, payload = rows[0]
    assert (file_url, line, event_id, kind) == (url, 1, "e1", GOOD["type"])
    assert ts.tzinfo is not None
    assert isinstance(payload, str)
    assert json.loads(payload) == {"user": "u1", "n": 3, "city": "Zürich"}
    assert rows[1][1] == 3
    assert (tally.total, tally.filtered, tally.candidates) == (3, 1, 2)


def test_ingest__does_not_import_sqlalchemy_or_celery() -> None:
    source = pathlib.Path(ingest.__file__).read_text()
    assert "sqlalchemy" not in source
    assert "celery" not in source


# -- sample data -----------------------------------------------------------------------------


def digest(paths: list[pathlib.Path]) -> list[tuple[str, str]]:
    return [(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths]


def test_make_batch__is_deterministic_with_the_seed(tmp_path: pathlib.Path) -> None:
    one = sample.make_batch(tmp_path / "one", n_files=7, lines_per_file=30, seed=42)
    two = sample.make_batch(tmp_path / "two", n_files=7, lines_per_file=30, seed=42)
    other = sample.make_batch(tmp_path / "other", n_files=7, lines_per_file=30, seed=43)
    assert digest(one) == digest(two)
    assert digest(one) != digest(other)


def test_make_batch__mixes_formats_with_malformed_lines_and_one_poison(
    tmp_path: pathlib.Path,
) -> None:
    paths = sample.make_batch(tmp_path, n_files=9, lines_per_file=40, malformed_every=8, seed=3)
    assert len(paths) == 9
    assert all(p.parent == tmp_path and p.exists() for p in paths)
    names = [p.name for p in paths]
    assert {n.split(".", 1)[1] for n in names if "poison" not in n} == {"jsonl", "csv", "jsonl.gz"}
    poison = [p for p in paths if "poison" in p.name]
    assert len(poison) == 1
    with pytest.raises(BadContent):
        read(urls.normalize(str(poison[0])))
    for path in paths:
        if path in poison:
            continue
        tally = Tally().add_all(read(urls.normalize(str(path))))
        assert (tally.total, tally.filtered, tally.candidates) == (40, 5, 35), path.name


def test_make_batch__without_poison_or_malformed_lines(tmp_path: pathlib.Path) -> None:
    paths = sample.make_batch(tmp_path, n_files=3, lines_per_file=5, malformed_every=None)
    paths += sample.make_batch(
        tmp_path / "b", n_files=2, lines_per_file=5, malformed_every=0, poison=False
    )
    assert len([p for p in paths if "poison" in p.name]) == 1
    for path in paths:
        if "poison" not in path.name:
            assert all(r.ok for r in read(urls.normalize(str(path))))
