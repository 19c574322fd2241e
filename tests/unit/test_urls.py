"""URL normalisation, refusals, and the submit fingerprint."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import fsspec
import hypothesis
import pytest
from hypothesis import strategies as st

from pipeline.errors import InvalidURL
from pipeline.sources import urls


@pytest.fixture
def any_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend every fsspec backend is installed (http needs aiohttp, which tests lack)."""
    monkeypatch.setattr(urls, "_filesystem_problem", lambda scheme: None)


def refusal(raw: str) -> str:
    with pytest.raises(InvalidURL) as caught:
        urls.normalize(raw)
    return str(caught.value.data["reason"])


# -- local paths -----------------------------------------------------------------------------


def test_normalize__three_spellings_of_one_local_file_agree(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absolute = tmp_path / "data" / "a b.jsonl"
    expected = absolute.as_uri()
    monkeypatch.chdir(tmp_path)

    assert urls.normalize("data/a b.jsonl") == expected
    assert urls.normalize("data/a b.jsonl", base=tmp_path) == expected
    assert urls.normalize(str(absolute)) == expected
    assert urls.normalize(expected) == expected
    assert expected.endswith("/data/a%20b.jsonl")


def test_normalize__relative_path_is_joined_to_base_not_cwd(tmp_path: pathlib.Path) -> None:
    assert urls.normalize("x.csv", base=tmp_path) == (tmp_path / "x.csv").as_uri()


def test_normalize__dot_segments_resolve_lexically_without_the_file_existing() -> None:
    assert urls.normalize("/srv/./in/../data//f.jsonl") == "file:///srv/data/f.jsonl"
    assert urls.normalize("file:///srv/in/../data/f.jsonl") == "file:///srv/data/f.jsonl"
    assert urls.normalize("//srv/f.jsonl") == "file:///srv/f.jsonl"


def test_normalize__symlinks_are_not_followed(tmp_path: pathlib.Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert urls.normalize(str(tmp_path / "link" / "f.jsonl")).endswith("/link/f.jsonl")


def test_normalize__tilde_expands(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert urls.normalize("~/in/f.jsonl") == (tmp_path / "in" / "f.jsonl").as_uri()


def test_normalize__file_url_spellings_agree() -> None:
    expected = "file:///srv/a%20b.jsonl"
    assert urls.normalize("file:/srv/a b.jsonl") == expected
    assert urls.normalize("FILE://localhost/srv/a%20b.jsonl") == expected
    assert urls.normalize("local:///srv/a%20b.jsonl") == expected


def test_normalize__percent_and_colons_in_local_names_are_encoded() -> None:
    # A literal "%20" in a file name is not a space; "::" must not reach fsspec's chaining.
    assert urls.normalize("/srv/c%20d.jsonl") == "file:///srv/c%2520d.jsonl"
    assert urls.normalize("/srv/p::q.jsonl") == "file:///srv/p%3A%3Aq.jsonl"


def test_normalize__strips_surrounding_whitespace() -> None:
    assert urls.normalize("  /srv/f.jsonl\n") == "file:///srv/f.jsonl"


# -- remote URLs -----------------------------------------------------------------------------


@pytest.mark.usefixtures("any_scheme")
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("HTTP://Example.COM", "http://example.com/"),
        ("http://example.com:80/a.jsonl", "http://example.com/a.jsonl"),
        ("https://Example.com:443/a.jsonl", "https://example.com/a.jsonl"),
        ("https://example.com:8443/a.jsonl", "https://example.com:8443/a.jsonl"),
        ("http://example.com:443/a", "http://example.com:443/a"),
        ("https://example.com/a%2fb?sig=%7e", "https://example.com/a%2Fb?sig=%7E"),
        ("https://example.com?x=1", "https://example.com/?x=1"),
    ],
)
def test_normalize__http_scheme_host_port_and_path(raw: str, expected: str) -> None:
    assert urls.normalize(raw) == expected


@pytest.mark.usefixtures("any_scheme")
def test_normalize__s3_keeps_bucket_and_key_as_given() -> None:
    assert urls.normalize("S3://MyBucket/Path/Key.JSONL") == "s3://MyBucket/Path/Key.JSONL"
    assert urls.normalize("s3a://MyBucket/k.jsonl") == "s3://MyBucket/k.jsonl"


def test_normalize__memory_scheme_is_served() -> None:
    assert urls.normalize("MEMORY://in/Data.jsonl") == "memory://in/Data.jsonl"
    assert urls.normalize("memory:///in/a.jsonl") == "memory:///in/a.jsonl"


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["", "   ", "\n"])
def test_normalize__empty_is_refused(raw: str) -> None:
    assert refusal(raw) == "empty URL"


@pytest.mark.parametrize("raw", ["a\tb.jsonl", "/srv/a\nb.jsonl", "/srv/\x7f", "file:///a%00b"])
def test_normalize__control_characters_are_refused(raw: str) -> None:
    assert refusal(raw).startswith("contains a control character")


def test_normalize__too_long_after_normalisation_is_refused() -> None:
    # 703 raw characters, but each space becomes "%20" and pushes the URL past the limit.
    raw = "/a" + " " * 700 + "b"
    assert len(raw) < urls.MAX_URL_LENGTH
    assert refusal(raw).startswith("longer than 2048 characters")
    assert len(urls.normalize("/" + "a" * (urls.MAX_URL_LENGTH - len("file:///")))) == 2048


def test_normalize__unknown_scheme_is_refused() -> None:
    assert refusal("nosuchfs://bucket/a.jsonl") == "no fsspec filesystem serves scheme 'nosuchfs'"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("simplecache::s3://b/a.jsonl", "chained fsspec URLs ('proto::url') are not supported"),
        ("memory://a::b", "contains '::', which fsspec reads as a chain of URLs"),
        ("file://server/share/a.jsonl", "file URL names host 'server'"),
        ("file:///srv/a.jsonl?x=1", "file URL has a query or fragment"),
        ("file:", "file URL has no path"),
        ("https://", "URL has no host"),
        ("https://example.com:99999/a", "invalid port"),
    ],
)
@pytest.mark.usefixtures("any_scheme")
def test_normalize__malformed_urls_are_refused(raw: str, reason: str) -> None:
    assert refusal(raw).startswith(reason)


def test_invalid_url__carries_the_raw_url_and_reason() -> None:
    with pytest.raises(InvalidURL, match="empty URL") as caught:
        urls.normalize(" ")
    assert caught.value.data == {"url": " ", "reason": "empty URL"}


# -- iter_normalized -------------------------------------------------------------------------


def test_iter_normalized__reports_refused_lines_and_goes_on(tmp_path: pathlib.Path) -> None:
    lines = ["a.jsonl\n", "\n", "  b.csv  \r\n", "nosuchfs://x\n", "c\td.jsonl\n", "memory://m"]
    result = list(urls.iter_normalized(lines, base=tmp_path))
    assert [number for number, _, _ in result] == [1, 2, 3, 4, 5, 6]
    assert result[0] == (1, (tmp_path / "a.jsonl").as_uri(), None)
    assert result[1] == (2, None, "empty line")
    assert result[2] == (3, (tmp_path / "b.csv").as_uri(), None)
    assert result[3] == (4, None, "no fsspec filesystem serves scheme 'nosuchfs'")
    assert result[4][1] is None
    assert str(result[4][2]).startswith("contains a control character (0x09)")
    assert result[5] == (6, "memory://m", None)


def test_iter_normalized__streams_lazily() -> None:
    def endless() -> Iterator[str]:
        while True:
            yield "/srv/f.jsonl"

    stream = urls.iter_normalized(endless())
    assert next(stream) == (1, "file:///srv/f.jsonl", None)
    assert next(stream)[0] == 2


# -- fingerprint -----------------------------------------------------------------------------


def test_fingerprint__changes_with_content_and_mtime(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "a b.jsonl"
    path.write_text('{"id": 1}\n')
    os.utime(path, (1_700_000_000, 1_700_000_000))
    url = urls.normalize(str(path))
    first = urls.fingerprint(url)
    assert first == "10:1700000000"
    assert urls.fingerprint(url) == first

    path.write_text('{"id": 12}\n')
    os.utime(path, (1_700_000_000, 1_700_000_000))
    grown = urls.fingerprint(url)
    assert grown not in (None, first)

    os.utime(path, (1_700_000_000, 1_700_000_001.5))
    touched = urls.fingerprint(url)
    assert touched == "11:1700000001.5"


def test_fingerprint__missing_file_is_none(tmp_path: pathlib.Path) -> None:
    assert urls.fingerprint((tmp_path / "nope.jsonl").as_uri()) is None


@pytest.mark.parametrize("url", ["nosuchfs://x/y", "", "s3://bucket/key", "memory://"])
def test_fingerprint__never_raises(url: str) -> None:
    assert urls.fingerprint(url) is None


def test_fingerprint__memory_file_uses_size_and_created() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/fp-test/a.jsonl", b"abc")
    try:
        value = urls.fingerprint("memory://fp-test/a.jsonl")
        assert value is not None
        assert value.startswith("3:")
    finally:
        fs.rm("/fp-test", recursive=True)


def test_fingerprint__prefers_etag_then_parses_times() -> None:
    info = urls.fingerprint_from_info
    assert info({"ETag": '"abc-2"', "size": 3, "mtime": 1}) == '"abc-2"'
    assert info({"etag": "x", "size": 3}) == "x"
    assert info({"size": 3, "LastModified": "2024-01-01T00:00:00Z"}) == "3:1704067200"
    assert info({"size": 3, "created": "2024-01-01T00:00:00"}) == "3:1704067200"
    assert info({"size": 3}) is None
    assert info({"type": "directory", "size": 0, "mtime": 1}) is None


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(
    scheme=st.sampled_from(["s3", "gs", "memory", "http", "https", "file", "s3a", "S3", "ftp"]),
    rest=st.text(alphabet="abcXYZ019._~/=+,-:@%?#", max_size=40),
)
def test_normalize__the_fast_path_for_canonical_urls_agrees_with_the_full_rules(
    scheme: str, rest: str
) -> None:
    raw = f"{scheme}://{rest}"
    try:
        full: str | None = urls._normalize(raw, None)
    except InvalidURL:
        full = None
    try:
        fast: str | None = urls.normalize(raw)
    except InvalidURL:
        fast = None
    assert fast == full
