"""A file's bytes as checked lines: regular files only, read in blocks of whole lines, each
block saying where in the raw stream it ends (what a resumed read seeks to).

Each block is checked at once for what makes a file not text (a NUL byte, bytes that are not
UTF-8), which is a `BadContent` naming the first bad line; a line longer than MAX_LINE_BYTES
is one too (a binary file without newlines), so memory stays bounded whatever the input.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import stat
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO, NamedTuple

from pipeline import masking
from pipeline.errors import PermanentError

# A "line" this long is almost surely a binary file without newlines; refusing it keeps
# memory bounded instead of buffering the whole file.
MAX_LINE_BYTES = 32 * 1024 * 1024
READ_BYTES = 1024 * 1024
# Bytes fetched per request from remote storage (s3fs would take 50 MiB at a time): memory per
# open file stays at about two of these however large the object.
REMOTE_BLOCK_BYTES = 8 * 1024 * 1024


class Block(NamedTuple):
    """Whole lines of a file, checked."""

    #: the number of its first line
    first: int
    #: the lines, without their b"\\n"
    lines: list[bytes]
    #: whether the last one had its b"\\n" (only a file's last line can lack it)
    ended: bool
    #: the byte of the stream just after the block (None where the stream cannot tell)
    end: int | None


# PermanentError is what the @checkpointed decorator treats as not worth a retry.
class BadInput(PermanentError):
    """The file cannot be processed as it is; retrying will not help."""


class BadContent(BadInput):
    """The file is not UTF-8 text (binary, another encoding, or a broken gzip stream)."""


class NotRegularFile(BadInput):
    """The URL names something that is not a regular file (a FIFO, a directory, a device)."""


def read_blocks(url: str, compression: str | None) -> Iterator[Block]:
    """The whole file's lines in checked blocks; opened when the first block is asked for."""
    from pipeline.sources import resumable  # it builds on this module

    with resumable.open_at(url, compression, resumable.BEGINNING, None) as opened:
        yield from line_blocks(url, opened.stream)


def line_blocks(url: str, stream: Any, *, line: int = 0, offset: int | None = 0) -> Iterator[Block]:
    """The lines of `stream` after `line` lines (at byte `offset` of it; None: the stream is
    at the start and the lines are skipped, unchecked, as already read), in checked blocks."""
    try:
        if offset is None and line:
            skipped = _skip_lines(stream, line)
            yield from _line_blocks(url, stream, line + 1, None, skipped)
        else:
            yield from _line_blocks(url, stream, line + 1, offset, b"")
    # A broken gzip stream is content, not an outage: the next attempt reads the same bytes.
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise BadContent(f"not a valid gzip file: {exc}", url=url) from exc


def _skip_lines(stream: Any, count: int) -> bytes:
    """Read past `count` lines without decoding them; what was read after the last one."""
    while chunk := stream.read(READ_BYTES):
        newlines = chunk.count(b"\n")
        if newlines < count:
            count -= newlines
            continue
        at = -1
        for _ in range(count):
            at = chunk.index(b"\n", at + 1)
        return bytes(chunk[at + 1 :])
    raise BadContent(f"the file has fewer lines than the {count} more to skip: it changed?")


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


@contextlib.contextmanager
def open_remote(
    url: str, fs: Any, path: str, *, headers: dict[str, str] | None = None
) -> Iterator[Any]:
    """A remote file's bytes (an object, an HTTP resource), if it is a file."""
    try:
        info = fs.info(path)
        if info.get("type") not in ("file", None):
            raise NotRegularFile(f"not a regular file: {info.get('type')}", url=url)
        extra = {"headers": headers} if headers else {}
        # fs.open rather than fsspec.open(url): fsspec would not percent-decode a file:// URL.
        opened = fs.open(path, mode="rb", block_size=_block_size(fs), **extra)
    except FileNotFoundError as exc:
        raise _not_found(url, exc) from exc
    with opened as stream:
        yield stream


def _block_size(fs: Any) -> int:
    """REMOTE_BLOCK_BYTES, or 0 over HTTP: one streamed GET per read of the file. A web server
    need not answer ranges (`python -m http.server` does not, and fsspec then refuses every
    block past the first), and a retry reads the file from its start anyway."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return 0 if {"http", "https"} & set(protocols) else REMOTE_BLOCK_BYTES


def _not_found(url: str, exc: FileNotFoundError) -> FileNotFoundError:
    """A remote backend's FileNotFoundError, saying so with the URL (s3fs's holds only the key,
    fsspec's HTTP one only the URL) and what the server answered, when it said (a 503 on HTTP
    reads as not found too). Still a FileNotFoundError: a missing file is retried."""
    cause = exc.__cause__ or exc.__context__
    reason = "No such object" + (f" ({type(cause).__name__}: {cause})" if cause else "")
    return FileNotFoundError(errno.ENOENT, masking.scrub(reason), url)


@contextlib.contextmanager
def open_local(url: str, path: str) -> Iterator[BinaryIO]:
    """A local file's bytes, if it is a regular file."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer; the check is on the descriptor
    # opened (fstat), so a file swapped for a FIFO after a stat cannot slip through.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise NotRegularFile(f"not a regular file: {path} is {kind}", url=url)
        os.set_blocking(fd, True)
        raw = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with raw:
        yield raw


_BOM = "\ufeff".encode()


def _line_blocks(
    url: str, stream: Any, number: int, offset: int | None, pending_start: bytes
) -> Iterator[Block]:
    """(number of the first line, lines without their b"\\n", whether each had one, the byte
    after the block) in blocks of whole lines, each block checked at once: no NUL byte and
    strict UTF-8, or BadContent. Only the file's last line can lack its newline.

    A block ends on a newline, which no UTF-8 sequence contains, so checking a block is
    checking each of its lines; the error names the first bad line, as a line-by-line
    check would.
    """
    pending = bytearray(pending_start)
    while chunk := stream.read(READ_BYTES):
        end = chunk.rfind(b"\n")
        if end == -1:
            pending += chunk
            if len(pending) > MAX_LINE_BYTES:
                raise BadContent(
                    f"line {number} is longer than {MAX_LINE_BYTES // 2**20} MiB; not a text file?",
                    url=url,
                    line=number,
                )
            continue
        block = bytes(pending) + chunk[:end] if pending else chunk[:end]
        pending = bytearray(chunk[end + 1 :])
        lines = _checked(url, number, block)
        if offset is not None:
            offset += len(block) + 1
        yield Block(number, lines, True, offset)
        number += len(lines)
    if pending:
        lines = _checked(url, number, bytes(pending))
        yield Block(number, lines, False, None if offset is None else offset + len(pending))


def _checked(url: str, number: int, block: bytes) -> list[bytes]:
    # (line, rank, problem): the first bad line wins and, on one line, a NUL before bad UTF-8.
    bad: list[tuple[int, int, str]] = []
    if (nul := block.find(b"\x00")) != -1:
        bad.append((block.count(b"\n", 0, nul), 0, "binary content (NUL byte)"))
    if not block.isascii():
        try:
            block.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = block.count(b"\n", 0, exc.start)
            bad.append((line, 1, f"not UTF-8 text: byte 0x{block[exc.start]:02x}"))
    if bad:
        offset, _rank, problem = min(bad)
        line = number + offset
        raise BadContent(f"{problem} on line {line}", url=url, line=line)
    lines = block.split(b"\n")
    if number == 1:
        # Spreadsheet exports start with a byte order mark; it is not part of the header.
        lines[0] = lines[0].removeprefix(_BOM)
    return lines
