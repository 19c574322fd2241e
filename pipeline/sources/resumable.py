"""A file's bytes opened where a resumed read left off, pinned to the object's version.

Positions are bytes of the raw stream (never characters, never decompressed bytes) and lines
read. They are used only on the version of the object they were read from: the version is
what the storage says now (S3's ETag and VersionId, HTTP's ETag or Last-Modified, a local
file's size, mtime and inode), and a resumed read is conditional, so the bytes cannot change
under it: S3 ranges carry If-Match (s3fs), an HTTP range carries If-Range, a local file is
checked on the descriptor that is read. Where the bytes cannot be sought (gzip; an HTTP server
that answers no ranges) they are read again from the start and skipped, said in the log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import logging
import os
from collections.abc import Iterator
from typing import Any, BinaryIO

from fsspec.implementations.local import LocalFileSystem

from pipeline.sources import textfile, urls

logger = logging.getLogger("pipeline")


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a read begins: after `line` lines, at byte `offset` of the raw stream (None: the
    stream cannot be sought there, the lines are skipped)."""

    line: int = 0
    offset: int | None = 0


BEGINNING = Start()


@dataclasses.dataclass
class Opened:
    """An opened file: its stream (at `start`), what version of the object it is, its
    fingerprint as submit would see it, and its size when known."""

    stream: BinaryIO
    version: str | None
    fingerprint: str | None
    size: int | None
    start: Start
    #: the raw bytes read so far (compressed bytes for gzip), for progress
    raw: Any = None

    def raw_offset(self) -> int | None:
        """How far into the raw stream the read is (what a resumed read would seek to)."""
        with contextlib.suppress(Exception):
            return int(self.raw.tell()) if self.raw is not None else None
        return None


@contextlib.contextmanager
def open_at(
    url: str, compression: str | None, start: Start, version: str | None
) -> Iterator[Opened]:
    """The file at `start` if the object is still `version`, else from the beginning (the
    caller compares `opened.version` and restarts its generation)."""
    fs, path = urls.filesystem(url)
    if compression is not None:
        start = Start(start.line, 0)  # the raw stream is read from its first byte
    if isinstance(fs, LocalFileSystem):
        opener = _local
    elif _is_http(fs):
        opener = _http
    else:
        opener = _object
    with opener(url, fs, path, start if version is not None else BEGINNING, version) as opened:
        if compression is None:
            yield opened
            return
        # gzip cannot be sought: decompress from the start and skip the committed lines. Its
        # positions carry no offset (a decompressed one is no byte of the raw stream).
        with gzip.GzipFile(fileobj=opened.stream, mode="rb") as unzipped:
            yield dataclasses.replace(
                opened,
                stream=unzipped,  # type: ignore[arg-type]
                start=Start(opened.start.line, None),
                raw=opened.stream,
            )


@contextlib.contextmanager
def _local(url: str, fs: Any, path: str, start: Start, version: str | None) -> Iterator[Opened]:
    with textfile.open_local(url, path) as raw:
        st = os.fstat(raw.fileno())
        now = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        fingerprint = urls.fingerprint_from_info({"size": st.st_size, "mtime": st.st_mtime})
        begin = start if now == version else BEGINNING
        if begin.offset:
            raw.seek(begin.offset)
        yield Opened(raw, now, fingerprint, st.st_size, begin, raw)


@contextlib.contextmanager
def _object(url: str, fs: Any, path: str, start: Start, version: str | None) -> Iterator[Opened]:
    """Object stores (S3 and any fsspec filesystem that reads in ranges). s3fs reads every
    range with If-Match on the ETag it saw when it opened the object: a change under the read
    fails it (FileExpired) instead of mixing versions."""
    with textfile.open_remote(url, fs, path) as stream:
        details = getattr(stream, "details", None) or {}
        etag = details.get("ETag") or details.get("etag")
        now = None if etag is None else f"{etag}{_version_id(details)}"
        now = now or urls.fingerprint_from_info(details)
        size = details.get("size")
        begin = start if now is not None and now == version else BEGINNING
        if begin.offset:
            stream.seek(begin.offset)
        fingerprint = urls.fingerprint_from_info(details)
        yield Opened(stream, now, fingerprint, size, begin, stream)


def _version_id(details: dict[str, Any]) -> str:
    version_id = details.get("VersionId")
    return f"?versionId={version_id}" if version_id and version_id != "null" else ""


@contextlib.contextmanager
def _http(url: str, fs: Any, path: str, start: Start, version: str | None) -> Iterator[Opened]:
    """One streamed GET: from `start.offset` with If-Range when the version is a validator the
    server can compare (a strong ETag or a date); the whole body otherwise."""
    headers = {}
    resuming = bool(start.offset) and version is not None
    if resuming and version is not None and _if_range(version):
        headers = {"Range": f"bytes={start.offset}-", "If-Range": version}
    with textfile.open_remote(url, fs, path, headers=headers) as stream:
        response = getattr(stream, "r", None)
        status = getattr(response, "status", 200)
        # aiohttp's headers: a case-insensitive mapping (a server may send "Etag")
        got = getattr(response, "headers", None) or {}
        now = got.get("ETag") or got.get("Last-Modified")
        size = _content_size(got, status)
        fingerprint = urls.fingerprint_from_info(
            {"ETag": got.get("ETag"), "Last-Modified": got.get("Last-Modified"), "size": size}
        )
        if not resuming or now is None or now != version:
            yield Opened(stream, now, fingerprint, size, BEGINNING, stream)
        elif status == 206 and got.get("Content-Range", "").startswith(f"bytes {start.offset}-"):
            yield Opened(stream, now, fingerprint, size, start, _Counted(stream, start.offset))
        else:
            # The same version, sent whole: no ranges here (or none asked). Read and skip.
            logger.info(
                "%s: the server sent the whole file; reading and skipping %s bytes to resume",
                url,
                start.offset,
            )
            _skip(stream, start.offset or 0)
            # the stream counts every byte it read, the skipped ones included
            yield Opened(stream, now, fingerprint, size, start, stream)


def _if_range(version: str) -> bool:
    """Whether `version` may go in If-Range: a strong ETag or an HTTP date (not a weak ETag)."""
    return version.startswith('"') or (not version.startswith("W/") and "," in version)


def _content_size(headers: Any, status: int) -> int | None:
    if status == 206 and "/" in headers.get("Content-Range", ""):
        total = headers["Content-Range"].rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _skip(stream: Any, count: int) -> None:
    while count > 0:
        got = stream.read(min(count, textfile.READ_BYTES))
        if not got:
            raise textfile.BadContent(f"the stream ended before byte {count} while resuming")
        count -= len(got)


class _Counted:
    """The raw position of a stream that cannot tell it (a resumed HTTP body)."""

    def __init__(self, stream: Any, base: int | None) -> None:
        self.stream = stream
        self.base = base or 0

    def tell(self) -> int:
        return self.base + int(self.stream.loc)


def _is_http(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return bool({"http", "https"} & set(protocols))
