"""SIGINT and SIGTERM in the CLI: noted at once, acted on where it is safe.

A KeyboardInterrupt raised wherever the main thread happens to be can land between a lock's
acquire and the block it guards: rich's live displays hold one around every refresh, and
their refresh thread then waits for that lock for ever while the main thread joins it (seen
in CI as a `submit --wait` still running 30 s after Ctrl-C). So a signal only sets
`received`; the code asks for it between steps, and marks the blocking waits where the
signal should stop it at once (`reading()`: a read of stdin, a query that may hang on an
unreachable database, a sleep between scans).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

BOTH = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    """The first signal sets `received` (its name); inside `reading()` it also raises
    KeyboardInterrupt there and then."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._reading = False

    def handler(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        if self._reading:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        self._reading = True
        try:
            yield
        finally:
            self._reading = False

    @contextlib.contextmanager
    def installed(self, signals: tuple[signal.Signals, ...] = BOTH) -> Iterator[Interrupts]:
        """This object's handler for `signals`, restored on the way out."""
        previous = {s: signal.signal(s, self.handler) for s in signals}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def installed_over_default(self) -> Iterator[Interrupts]:
        """Installed for SIGINT only where Python's default handler is in place, on the main
        thread; a caller with a handler of its own (the demo's) keeps it."""
        own = (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        )
        with self.installed((signal.SIGINT,)) if own else contextlib.nullcontext(self):
            yield self

    def sleep(self, seconds: float) -> None:
        """Sleep up to `seconds`, waking within 0.1 s of a signal."""
        end = time.monotonic() + seconds
        while not self.received and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended."""
        return 128 + signal.Signals[self.received or "SIGINT"].value
