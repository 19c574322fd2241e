"""The deadline watcher (pipeline/store/postgres/link.py) on real sockets and threads: a read
past its deadline is ended by shutting its socket down, and the watcher outlives a chore
(`on_tick`) that fails; dead, it would end no call again in that process (issue 21)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import pytest

from pipeline.store.postgres.link import Deadlines

DEADLINE = 0.4
# A read nothing ends but the deadline: it fails the test instead of hanging it.
SAFETY = 5.0


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.settimeout(SAFETY)
    yield ours, theirs
    ours.close()
    theirs.close()


def _silent_read(deadlines: Deadlines, sock: socket.socket) -> tuple[bytes, bool, float]:
    """A read on a socket whose peer never writes, under a deadline: (what it read, whether
    the deadline ended it, how long it took)."""
    started = time.monotonic()
    with deadlines.bound(sock.fileno()) as call:
        try:
            data = sock.recv(1)
        except TimeoutError:
            data = b"(still waiting)"
    return data, call.ended, time.monotonic() - started


def test_a_read_past_its_deadline_is_ended(pair: tuple[socket.socket, socket.socket]) -> None:
    deadlines = Deadlines(DEADLINE)
    data, ended, took = _silent_read(deadlines, pair[0])
    assert (data, ended) == (b"", True)
    assert DEADLINE <= took < DEADLINE + 1.0, took
    assert deadlines.ended == 1


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def pipeline_warnings() -> Iterator[list[str]]:
    """The "pipeline" logger's warnings, read on the logger itself and enabled for the test:
    another test of the same process may have configured logging (Celery's set-up, a
    `dictConfig` disabling existing loggers, a level), after which caplog on the root logger
    saw nothing (CI, under four test processes)."""
    handler = _Records()
    logger = logging.getLogger("pipeline")
    saved = (logger.level, logger.disabled)
    logger.setLevel(logging.WARNING)
    logger.disabled = False
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.disabled = saved[1]


def test_a_failing_on_tick_leaves_the_watcher_ending_calls(pipeline_warnings: list[str]) -> None:
    ticks: list[float] = []
    failing = [True]

    def failing_chore() -> None:
        ticks.append(time.monotonic())
        if failing[0]:
            raise RuntimeError("closing an idle connection failed")

    deadlines = Deadlines(DEADLINE, failing_chore)
    # Two reads in a row, each past several failed ticks: both ended by their deadline.
    for _ in range(2):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            ours.settimeout(SAFETY)
            data, ended, took = _silent_read(deadlines, ours)
        assert (data, ended) == (b"", True), (data, took)
        assert took < DEADLINE + 1.0, took
    failing[0] = False  # the watcher lives on after the test (a daemon thread): quiet now
    assert len(ticks) >= 4
    assert deadlines.ended == 2
    assert "closing idle database connections failed" in pipeline_warnings
