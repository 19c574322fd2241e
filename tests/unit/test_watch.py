"""`watch.scan` and `watch.run` over the in-memory store and a local folder, with a fake send."""

from __future__ import annotations

import os
import pathlib
import signal
from typing import Any

import pytest

from pipeline import errors
from pipeline.interrupts import Interrupts
from pipeline.sources import producer, watch
from pipeline.store.memory import MemoryStore
from tests.support.fakes import RecordingSend, complete, register_calls


@pytest.fixture
def folder(tmp_path: pathlib.Path) -> pathlib.Path:
    for i in range(5):
        (tmp_path / f"{i}.jsonl").write_text(f"{i}\n")
    return tmp_path


def _scan(
    store: MemoryStore, folder: pathlib.Path, send: RecordingSend, **kw: Any
) -> watch.ScanReport:
    return watch.scan(store, f"{folder}/*.jsonl", send, batch_id="w", **kw)


def test_scan__counts_new_changed_and_enqueues_only_those(folder: pathlib.Path) -> None:
    store, send = MemoryStore(), RecordingSend()
    first = _scan(store, folder, send)
    assert (first.seen, first.new, first.changed, first.enqueued) == (5, 5, 0, 5)
    assert first.ok
    assert first.error is None
    for url in send.urls:
        complete(store, url)
    # One file rewritten (size and mtime change), one added, the rest as they were.
    (folder / "2.jsonl").write_text("rewritten, longer\n")
    os.utime(folder / "2.jsonl", (1, 1))
    (folder / "9.jsonl").write_text("9\n")
    send.calls.clear()
    second = _scan(store, folder, send)
    assert (second.seen, second.new, second.changed, second.enqueued) == (6, 1, 1, 2)
    assert sorted(pathlib.Path(u).name for u in send.urls) == ["2.jsonl", "9.jsonl"]
    assert "6 seen, 1 new, 1 changed, 2 enqueued" in second.line()


def test_scan__pending_rows_of_an_earlier_scan_are_not_sent_again(folder: pathlib.Path) -> None:
    """Unlike a resubmission: the watch that registered them sent their messages."""
    store, send = MemoryStore(), RecordingSend()
    _scan(store, folder, send)
    again = _scan(store, folder, send)
    assert (again.new, again.changed, again.enqueued) == (0, 0, 0)
    assert len(send.calls) == 5


def test_scan__one_register_call_per_chunk(folder: pathlib.Path) -> None:
    store, send = MemoryStore(), RecordingSend()
    _scan(store, folder, send, chunk_size=2)
    assert [len(c) for c in register_calls(store)] == [2, 2, 1]


def test_scan__a_storage_error_skips_the_scan_with_one_line(
    folder: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(pattern: str, **_: object) -> producer.Source:
        raise PermissionError("Access Denied\nsecond line of detail")
        yield  # pragma: no cover

    monkeypatch.setattr(producer, "from_glob", broken)
    report = _scan(MemoryStore(), folder, RecordingSend())
    assert not report.ok
    assert report.error == "PermissionError: Access Denied"
    assert "skipped after" in report.line()
    assert "\n" not in report.line()


def test_scan__database_unreachable_skips_the_scan(folder: pathlib.Path) -> None:
    class Down(MemoryStore):
        def register(self, *a: Any, **kw: Any) -> Any:
            raise errors.StoreUnavailable("database postgresql://u:***@db/x unreachable")

    report = _scan(Down(), folder, RecordingSend())
    assert report.error is not None
    assert "unreachable" in report.error


def test_scan__a_pattern_with_an_unknown_scheme_raises(folder: pathlib.Path) -> None:
    with pytest.raises(errors.InvalidURL):
        watch.scan(MemoryStore(), "nosuchscheme://b/*.jsonl", RecordingSend())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_scan__a_signal_mid_scan_finishes_the_chunk_in_hand(
    folder: pathlib.Path, sig: signal.Signals
) -> None:
    store = MemoryStore()
    sent: list[str] = []

    def send(task: str, url: str) -> None:
        sent.append(url)
        if len(sent) == 1:
            os.kill(os.getpid(), sig)

    with Interrupts().installed() as interrupts:
        report = _scan(store, folder, send, chunk_size=2, interrupts=interrupts)  # type: ignore[arg-type]
    assert report.interrupted == sig.name
    assert len(sent) == 2  # the first chunk, every registered row with its message
    assert sum(store.summary()["w"].values()) == 2


def test_run__scans_every_interval_until_a_signal_during_the_sleep() -> None:
    reports = iter(watch.ScanReport("p", seconds=0.25) for _ in range(10))
    slept: list[float] = []
    seen: list[watch.ScanReport] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with Interrupts().installed() as interrupts:
        stopped = watch.run(
            lambda: next(reports), 2.0, interrupts=interrupts, on_scan=seen.append, sleep=sleep
        )
    assert stopped == "SIGTERM"
    assert len(seen) == 3
    assert slept == [1.75, 1.75, 1.75]  # from the start of one scan to the next


def test_run__once_returns_after_one_scan() -> None:
    with Interrupts().installed() as interrupts:
        seen: list[watch.ScanReport] = []
        stopped = watch.run(
            lambda: watch.ScanReport("p"), 30, interrupts=interrupts, on_scan=seen.append, once=True
        )
    assert (stopped, len(seen)) == (None, 1)
