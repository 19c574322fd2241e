"""Secrets never printed: the masking of database and broker URLs, as a property."""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from pipeline import masking

PRINTABLE = st.text(alphabet=[chr(c) for c in range(0x20, 0x7F)], min_size=4, max_size=40)
TEMPLATES = [
    "postgresql://app:{pw}@db.example.com:5432/app",
    "postgresql+psycopg://app:{pw}@db.example.com/app?sslmode=require",
    "postgres://app:{pw}@10.0.0.7/app",
    "redis://:{pw}@cache.example.com:6379/0",
    "rediss://default:{pw}@cache.example.com:6380/1",
    "amqp://guest:{pw}@mq.example.com:5672//vhost",
    "sentinel://:{pw}@s1.example.com:26379;sentinel://:{pw}@s2.example.com:26379",
]


def _unsurprising(password: str, template: str) -> None:
    """Skip a password that is a piece of the rest of the URL or of the mask's own words."""
    skeleton = template.replace("{pw}", "") + masking.MASK + "(hidden: it may hold a password)"
    assume(password not in skeleton)


@settings(max_examples=300, deadline=None)
@given(password=PRINTABLE, template=st.sampled_from(TEMPLATES), quoted=st.booleans())
@example(password="S3cret#Pw", template=TEMPLATES[0], quoted=False)
@example(password="a/b?c@d:e", template=TEMPLATES[3], quoted=False)
@example(password="p@ss@word", template=TEMPLATES[5], quoted=False)
def test_mask_url__no_password_survives(password: str, template: str, quoted: bool) -> None:
    _unsurprising(password, template)
    secret = urllib.parse.quote(password, safe="") if quoted else password
    url = template.format(pw=secret)
    shown = masking.mask_url(url)
    assert password not in shown
    assert secret not in shown
    assert masking.mask_url(url) == shown
    # The same in an error message that quotes the URL, as drivers do.
    message = masking.scrub(f"could not connect to {url!r}: connection refused", url)
    assert password not in message
    assert secret not in message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:S3cret#Pw@host/db", "postgresql://u:***@host/db"),
        ("postgresql://u:p@q@host/db", "postgresql://u:***@host/db"),
        ("redis://:pa#ss@h:6379/0", "redis://:***@h:6379/0"),
        ("amqp://g:x/y?z@h//v", "amqp://g:***@h//v"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        (None, "(not set)"),
    ],
)
def test_mask_url__keeps_what_is_not_secret(url: str | None, expected: str) -> None:
    assert masking.mask_url(url) == expected


def test_scrub__pieces_of_a_password_a_parser_cut_short_are_removed() -> None:
    url = "redis://:Pa55#w0rd@127.0.0.1:1/0"
    message = masking.scrub("Port could not be cast to integer value as 'Pa55'", url)
    assert "Pa55" not in message


@pytest.mark.parametrize(
    "url",
    [
        "ftp://u:pw@host/x",
        "s3://KEY:SECRET@bucket/x",
        "s3://KEY:SE/CRET@bucket/x",
        "memory://u:p@x/y",
        "webhdfs://user@nn/x",
        "abfss://container:ACCOUNTKEY@account.dfs.core.windows.net/x",
    ],
)
def test_has_userinfo__credentials_in_file_urls_are_seen(url: str) -> None:
    assert masking.has_userinfo(url)


@pytest.mark.parametrize(
    "url", ["https://host:8080/a@b.jsonl", "s3://bucket/a@b", "file:///tmp/a@b", "/tmp/x"]
)
def test_has_userinfo__an_at_sign_in_the_path_is_not_credentials(url: str) -> None:
    assert not masking.has_userinfo(url)


@pytest.mark.parametrize(
    "url",
    [
        "abfss://container@account.dfs.core.windows.net/in/a.jsonl",
        "az://container@account/x",
        "wasbs://container@account.blob.core.windows.net/x",
    ],
)
def test_has_userinfo__an_azure_container_before_the_at_sign_is_not_credentials(url: str) -> None:
    assert not masking.has_userinfo(url)
