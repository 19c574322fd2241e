"""A real signal during submit: the chunk in hand is finished, nothing after it is read."""

from __future__ import annotations

import os
import signal

import pytest

from pipeline import errors
from pipeline.interrupts import Interrupts
from pipeline.sources import producer
from pipeline.store.memory import MemoryStore


def _source(n: int) -> producer.Source:
    return producer.from_lines((f"/d/{i:04d}.jsonl" for i in range(n)), fingerprints=False)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_sending__chunk_finished_then_submit_stops(sig: signal.Signals) -> None:
    store = MemoryStore()
    sent: list[str] = []

    def send(task: str, url: str) -> None:
        sent.append(url)
        if len(sent) == 5:  # mid-chunk: registered rows are being sent
            os.kill(os.getpid(), sig)

    with Interrupts().installed() as interrupts:
        report = producer.submit(store, _source(100), send, chunk_size=20, interrupts=interrupts)
    assert report.interrupted == sig.name
    assert len(sent) == 20  # the whole first chunk, not a row more
    assert report.last_line == 20
    pending = [u for u in sent if store.get(u) is not None]
    assert len(pending) == len(sent) == sum(c for c in store.summary()[None].values())


def test_signal_while_reading__lines_read_so_far_are_submitted() -> None:
    store = MemoryStore()
    sent: list[str] = []

    def reading() -> producer.Source:
        for i, item in enumerate(_source(100)):
            if i == 7:
                os.kill(os.getpid(), signal.SIGINT)
            yield item

    with Interrupts().installed() as interrupts:
        report = producer.submit(
            store, reading(), lambda t, u: sent.append(u), chunk_size=50, interrupts=interrupts
        )
    assert report.interrupted == "SIGINT"
    assert len(sent) == 7
    assert sum(store.summary()[None].values()) == 7


def test_handlers_restored_after_submit() -> None:
    before = signal.getsignal(signal.SIGINT)
    with Interrupts().installed():
        assert signal.getsignal(signal.SIGINT) != before
    assert signal.getsignal(signal.SIGINT) == before


def test_submit__overlong_batch_name_refused_before_anything_is_registered() -> None:
    store = MemoryStore()
    with pytest.raises(errors.InvalidInput, match="batch name too long"):
        producer.submit(store, _source(3), lambda t, u: None, batch_id="b" * 4000)
    assert store.summary() == {}
