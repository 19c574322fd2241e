"""Storage schemes at submit: the extra a missing backend needs, credentials refused and masked,
and the fingerprints of HTTP responses."""

from __future__ import annotations

from collections.abc import Iterator

import fsspec
import pytest

from pipeline.errors import InvalidURL
from pipeline.sources import producer, urls

SECRET = "pipeline-test-secret-do-not-print"


@pytest.fixture
def no_backends(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As if no fsspec backend package were installed (s3fs and aiohttp are, here)."""
    real = fsspec.get_filesystem_class

    def missing(protocol: str) -> type:
        if protocol in ("file", "memory"):
            return real(protocol)  # type: ignore[no-any-return]
        raise ImportError(f"Install the package for {protocol}")

    urls._filesystem_problem.cache_clear()
    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    yield
    # The refusals were cached under the fake: the next test must see the real backends.
    urls._filesystem_problem.cache_clear()


def refusal(raw: str) -> str:
    with pytest.raises(InvalidURL) as caught:
        urls.normalize(raw)
    return str(caught.value.data["reason"])


@pytest.mark.usefixtures("no_backends")
@pytest.mark.parametrize(
    ("url", "scheme", "extra"),
    [
        ("s3://bucket/a.jsonl", "s3", "s3"),
        ("s3a://bucket/a.jsonl", "s3", "s3"),
        ("http://example.com/a.jsonl", "http", "http"),
        ("https://example.com/a.jsonl", "https", "http"),
        ("gs://bucket/a.jsonl", "gs", "gcs"),
        ("gcs://bucket/a.jsonl", "gs", "gcs"),
        ("az://container/a.jsonl", "az", "azure"),
        ("abfs://container/a.jsonl", "abfs", "azure"),
    ],
)
def test_normalize__scheme_without_its_backend_names_the_extra(
    url: str, scheme: str, extra: str
) -> None:
    assert refusal(url) == (
        f"scheme {scheme!r} needs the {extra} extra: pip install 'pipeline-exactly-once[{extra}]'"
    )


@pytest.mark.usefixtures("no_backends")
def test_scheme_problem__abfss_names_the_azure_extra() -> None:
    assert urls.scheme_problem("abfss://container/a.jsonl") == (
        "scheme 'abfss' needs the azure extra: pip install 'pipeline-exactly-once[azure]'"
    )
    assert urls.scheme_problem("/local/a.jsonl") is None
    assert urls.scheme_problem("file:///local/a.jsonl") is None


@pytest.mark.usefixtures("no_backends")
def test_from_glob__scheme_without_its_backend_is_refused_naming_the_extra() -> None:
    with pytest.raises(InvalidURL) as caught:
        list(producer.from_glob("s3://bucket/prefix/**/*.jsonl"))
    assert "needs the s3 extra: pip install 'pipeline-exactly-once[s3]'" in str(caught.value)


def test_scheme_problem__installed_backends_pass() -> None:
    urls._filesystem_problem.cache_clear()
    assert urls.scheme_problem("s3://bucket/a.jsonl") is None
    assert urls.scheme_problem("https://example.com/a.jsonl") is None
    assert urls.scheme_problem("nosuchfs://x") == "no fsspec filesystem serves scheme 'nosuchfs'"


@pytest.mark.parametrize(
    "url",
    [
        f"s3://AKIAEXAMPLE:{SECRET}@bucket/a.jsonl",
        f"s3://{SECRET}@bucket/a.jsonl",
        f"http://user:{SECRET}@example.com/a.jsonl",
        f"https://user:{SECRET}@example.com:8443/a.jsonl",
        f"gs://user:{SECRET}@bucket/a.jsonl",
    ],
)
def test_normalize__credentials_in_a_storage_url_are_refused_and_never_repeated(url: str) -> None:
    with pytest.raises(InvalidURL) as caught:
        urls.normalize(url)
    assert "carries credentials" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value.data)
    assert "AKIAEXAMPLE" not in str(caught.value)


def test_from_lines__credentials_refused_and_masked_in_the_report() -> None:
    (item,) = producer.from_lines([f"s3://AKIAEXAMPLE:{SECRET}@bucket/a.jsonl"])
    _line, shown, url, _fp, reason = item
    assert url is None
    assert reason is not None
    assert "carries credentials" in reason
    assert SECRET not in shown
    assert "AKIAEXAMPLE" not in shown


def test_from_glob__credentials_in_the_pattern_are_refused_and_masked() -> None:
    with pytest.raises(InvalidURL) as caught:
        list(producer.from_glob(f"s3://AKIAEXAMPLE:{SECRET}@bucket/**/*.jsonl"))
    assert SECRET not in str(caught.value)


# -- HTTP fingerprints (fsspec's HTTPFileSystem.info passes the headers on) -------------------


def test_fingerprint_from_info__http_etag_wins() -> None:
    info = {"name": "u", "size": 10, "type": "file", "ETag": 'W/"v1"', "Last-Modified": "x"}
    assert urls.fingerprint_from_info(info) == 'W/"v1"'


def test_fingerprint_from_info__http_last_modified_with_size() -> None:
    info = {"size": 10, "type": "file", "Last-Modified": "Tue, 01 Dec 2026 10:00:00 GMT"}
    assert urls.fingerprint_from_info(info) == "10:1796119200"
    later = {**info, "Last-Modified": "Tue, 01 Dec 2026 10:00:01 GMT"}
    assert urls.fingerprint_from_info(later) == "10:1796119201"


def test_fingerprint_from_info__chunked_http_response_uses_the_date_alone() -> None:
    info = {"size": None, "type": "file", "Last-Modified": "Tue, 01 Dec 2026 10:00:00 GMT"}
    assert urls.fingerprint_from_info(info) == "-:1796119200"


def test_fingerprint_from_info__http_without_validators_is_none() -> None:
    assert urls.fingerprint_from_info({"size": 10, "type": "file", "mimetype": "x"}) is None
    assert urls.fingerprint_from_info({"size": 10, "Last-Modified": "not a date"}) is None
    assert urls.fingerprint_from_info({"size": None, "mtime": 5}) is None
