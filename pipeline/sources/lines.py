"""Input lines for submit (--from FILE, stdin), read with a cap: memory stays bounded.

A line is what ends in "\\n" (a lone "\\r" is part of the line, refused later as a control
character, so it cannot split one line into two and shift the numbers after it; a "\\r\\n"
ending is the newline of a Windows file). Each line is decoded as strict UTF-8: a name that
is not UTF-8 is refused with its line number, never turned into another name. A line longer
than any URL could be is refused while it is read; when the rest of it runs on and on (no
newline within SKIP_LIMIT bytes: /dev/zero, a binary file), reading stops, refused.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from pipeline import errors
from pipeline.sources import urls

# UTF-8 takes at most 4 bytes a character; normalising never makes a URL shorter than what
# was typed, except for surrounding blanks: a line past this cannot become a valid URL.
MAX_LINE_BYTES = 4 * urls.MAX_URL_LENGTH + 1024
# How far past an over-long line to look for the next newline before giving up on the input.
SKIP_LIMIT = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Refused:
    """A line refused while reading: the reason, and its start (for the report)."""

    reason: str
    text: str = ""
    final: bool = False  # reading stopped here


def read_lines(
    stream: BinaryIO, *, max_bytes: int = MAX_LINE_BYTES, skip_limit: int = SKIP_LIMIT
) -> Iterator[str | Refused]:
    """Each line of a binary stream, decoded, without its newline; or why it was refused."""
    while raw := stream.readline(max_bytes + 1):
        if len(raw) > max_bytes and not raw.endswith(b"\n"):
            start = raw[:120].decode("utf-8", "replace")
            if not _skip_rest(stream, skip_limit):
                yield Refused(
                    f"longer than {urls.MAX_URL_LENGTH} characters and no end of line within "
                    f"{skip_limit // 1024} KiB: not a list of URLs, stopped reading",
                    start,
                    final=True,
                )
                return
            yield Refused(f"longer than {urls.MAX_URL_LENGTH} characters", start)
            continue
        line = raw[:-1] if raw.endswith(b"\n") else raw
        line = line[:-1] if line.endswith(b"\r") else line
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield Refused(
                f"not UTF-8: byte 0x{line[exc.start]:02x} at byte {exc.start + 1}",
                line[:120].decode("utf-8", "replace"),
            )


def _skip_rest(stream: BinaryIO, limit: int) -> bool:
    """Read past the rest of a line; False if no newline came within `limit` bytes."""
    skipped = 0
    while skipped <= limit:
        part = stream.readline(64 * 1024)
        if not part or part.endswith(b"\n"):
            return True
        skipped += len(part)
    return False


def input_lines(arguments: Iterable[str], from_file: str | None) -> Iterator[str | Refused]:
    """What `submit` reads: each argument as given (`-` for stdin), then the lines of
    `from_file`; stdin and the file read in bounded lines."""
    for argument in arguments:
        if argument == "-":
            stdin = getattr(sys.stdin, "buffer", None)
            if stdin is None:
                raise errors.InvalidInput("cannot read URLs from stdin: it is closed")
            yield from read_lines(stdin)
        else:
            yield argument
    if from_file:
        with open(from_file, "rb") as handle:
            yield from read_lines(handle)
