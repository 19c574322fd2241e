"""Stand-ins for the unit tests of submit and watch: a `send` that records, and shortcuts
on the in-memory store."""

from __future__ import annotations

from typing import Any

from pipeline.models import Stats, Status
from pipeline.store.memory import MemoryStore


class RecordingSend:
    """A fake `send(task_name, url)` that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, task_name: str, url: str) -> None:
        self.calls.append((task_name, url))

    @property
    def urls(self) -> list[str]:
        return [u for _, u in self.calls]


def register_calls(store: MemoryStore) -> list[Any]:
    """The (url, fingerprint) pairs of each `register` call, in order."""
    return [given for name, given in store.calls if name == "register"]


def complete(store: MemoryStore, url: str) -> None:
    """A registered file, completed (one record read and kept)."""
    store.mark(url, Status.COMPLETED, stats=Stats(1, 0, 1))
