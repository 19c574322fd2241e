"""Driver errors become the project's own at one boundary, with secrets masked."""

from __future__ import annotations

import pytest

import pipeline
from pipeline import errors, masking

# Nothing listens on port 1: the connection is refused at once.
CLOSED = "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/x"


def test_store_unavailable__closed_port_raises_with_the_password_masked() -> None:
    store = pipeline.open_store(CLOSED)
    try:
        with pytest.raises(pipeline.StoreUnavailable) as caught:
            store.get("file:///data/a.csv")
    finally:
        store.close()
    message = str(caught.value)
    assert "s3cret" not in message
    assert "postgres:***@127.0.0.1:1/x" in message
    assert "s3cret" not in repr(caught.value.data)
    assert isinstance(caught.value, errors.PipelineError)


def test_store_unavailable__every_transition_translates() -> None:
    store = pipeline.open_store(CLOSED)
    calls = [
        lambda: store.claim("file:///a", "w1"),
        lambda: store.heartbeat("file:///a", 1),
        lambda: store.complete("file:///a", 1),
        lambda: store.fail("file:///a", 1, "boom"),
        lambda: store.register(["file:///a"]),
        lambda: store.requeue(),
        lambda: store.reap(),
        lambda: store.summary(),
        lambda: store.upgrade(),
    ]
    try:
        for call in calls:
            with pytest.raises(pipeline.StoreUnavailable, match=r"\*\*\*") as caught:
                call()
            assert "s3cret" not in str(caught.value)
    finally:
        store.close()


def test_errors__default_message_is_the_docstring_and_data_is_kept() -> None:
    error = errors.LostClaim(url="file:///a", token=7)
    assert str(error) == errors.LostClaim.__doc__
    assert (error.data, error.url, error.token) == (
        {"url": "file:///a", "token": 7},
        "file:///a",
        7,
    )  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:s3cret@db:5432/x", "postgresql://u:***@db:5432/x"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("postgresql://u@db/x", "postgresql://u@db/x"),
        (None, "(not set)"),
    ],
)
def test_mask_url__hides_only_the_password(url: str | None, shown: str) -> None:
    assert masking.mask_url(url) == shown
