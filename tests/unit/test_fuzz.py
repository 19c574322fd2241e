"""A fuzz pass that stays: URL normalisation, the bounded line reader and the ingest's line
parser over random input. Only the project's own exceptions escape, memory stays bounded,
and every refusal names its line."""

from __future__ import annotations

import csv
import io
import json
import pathlib
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import errors
from pipeline.reference import formats, ingest
from pipeline.sources import lines, producer, urls

FAST = settings(max_examples=150, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
SCHEMES = ["", "file://", "file:", "memory://", "s3://", "http://", "ftp://", "x-y://", "::"]
NASTY = "\x00\x1f\x7f\x85\u202e\u2028\u200b\ufeff:/?#@[]%\\ \t\r\n"
TEXT = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(NASTY), max_size=80)


@FAST
@given(prefix=st.sampled_from(SCHEMES), rest=TEXT)
def test_normalize__accepts_or_refuses_with_a_reason_never_crashes(prefix: str, rest: str) -> None:
    raw = prefix + rest
    reason = None
    try:
        url = urls.normalize(raw)
    except errors.InvalidURL as refusal:
        url, reason = "", refusal.data["reason"]
    if not url:
        assert reason
        return
    assert len(url) <= urls.MAX_URL_LENGTH
    assert not any(ch in url for ch in "\x00\n\r\u202e\u2028")
    assert "://" in url


@FAST
@given(data=st.binary(max_size=4000) | st.lists(TEXT).map(lambda t: "\n".join(t).encode()))
def test_read_lines__each_line_a_name_or_a_refusal_with_its_number(data: bytes) -> None:
    items = list(lines.read_lines(io.BytesIO(data), max_bytes=200, skip_limit=1000))
    physical = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    assert len(items) <= max(physical, 1)
    for number, _text, url, _fp, reason in producer.from_lines(items, fingerprints=False):
        assert 1 <= number <= len(items)
        assert (url is None) == (reason is not None)


def test_read_lines__memory_bounded_on_an_endless_line() -> None:
    data = io.BytesIO(b"x" * (8 * 2**20))  # 8 MiB, no newline
    tracemalloc.start()
    try:
        items = list(lines.read_lines(data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(items) == 1
    assert isinstance(items[0], lines.Refused)
    assert items[0].final
    assert peak < 2**20  # well under the input's size


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
EVENTS = st.fixed_dictionaries(
    {"id": TEXT, "ts": st.sampled_from(["2024-01-01T00:00:00Z", "x", ""]) | TEXT, "type": TEXT},
    optional={"payload": JSON_VALUES},
)


def _check_file(path: pathlib.Path, physical_lines: int) -> None:
    try:
        records = list(formats.read_records(path.as_uri()))
    except ingest.BadInput:
        return  # the file as a whole refused (not UTF-8, binary): a permanent failure
    for record in records:
        assert 1 <= record.line <= max(physical_lines, 1)
        if not record.ok:
            assert record.problem
            assert record.describe().startswith(f"line {record.line}: ")
        else:
            # Storable, whichever path parsed it (the unchecked walk agrees), and encodable.
            assert record.event is not None
            event = record.event
            assert ingest._unstorable(event.id, event.type, event.payload) is None
            assert len(list(ingest.copy_rows(path.as_uri(), [record], ingest.Tally()))) == 1


@FAST
@given(rows=st.lists(st.one_of(JSON_VALUES, EVENTS), max_size=8), ascii=st.booleans())
def test_ingest_jsonl__random_json_lines_parsed_or_refused_per_line(
    rows: list[object], ascii: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("fz") / "f.jsonl"
    # Without ensure_ascii most lines have no \u escape: the parser's checked path.
    text = "".join(json.dumps(r, ensure_ascii=ascii) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _check_file(path, len(rows))


@FAST
@given(data=st.binary(max_size=2000), suffix=st.sampled_from([".jsonl", ".csv"]))
def test_ingest__random_bytes_never_escape_but_as_bad_input(
    data: bytes, suffix: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("fz") / f"f{suffix}"
    path.write_bytes(data)
    _check_file(path, data.count(b"\n") + 1)


CELLS = st.text(alphabet=st.sampled_from('ab,"\n\r 2024-01-01T00:00:00Z'), max_size=12)


@FAST
@given(rows=st.lists(st.lists(CELLS, min_size=1, max_size=4), max_size=8), raw=st.booleans())
def test_ingest_csv__random_rows_every_line_counted(
    rows: list[list[str]], raw: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("fz") / "f.csv"
    if raw:  # cells joined without quoting: unbalanced quotes and all
        body = "id,ts,type\n" + "".join(",".join(r) + "\n" for r in rows)
    else:
        out = io.StringIO()
        csv.writer(out).writerows([["id", "ts", "type"], *rows])
        body = out.getvalue()
    path.write_text(body)
    _check_file(path, body.count("\n") + 1)


def test_ingest__memory_bounded_on_a_file_with_one_endless_line(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "endless.jsonl"
    size = ingest.MAX_LINE_BYTES + 8 * 2**20
    with path.open("wb") as handle:
        handle.truncate(size)  # sparse: NUL bytes, no newline
    tracemalloc.start()
    try:
        with pytest.raises(ingest.BadContent, match="longer than"):
            list(formats.read_records(path.as_uri()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < ingest.MAX_LINE_BYTES + 4 * 2**20  # one line's cap, not the file's size
