"""File URLs: one normalised key per file, refusals with a reason, and the submit fingerprint.

The normalised URL is the checkpoint row's primary key, so every spelling of the same file must
give the same string: `data/a b.jsonl`, `/abs/data/a b.jsonl` and
`file:///abs/data/a%20b.jsonl` all become the last one.

fsspec does not percent-decode `file://` URLs, reads `file://localhost/x` as a relative path,
and splits any path containing `::` into a chain; `filesystem()` is therefore the one way this
project turns a normalised URL back into something to open.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import functools
import os
import pathlib
import re
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import fsspec

from pipeline import masking
from pipeline.errors import InvalidURL

MAX_URL_LENGTH = 2048

_SCHEME_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_FILE_URL = re.compile(r"^file:", re.IGNORECASE)
# C0 and C1 controls, and the invisible characters that reorder or break a line when shown
# (bidi embeddings, overrides and isolates, zero-width marks, line and paragraph separators,
# the BOM): a URL holding one would not look like the file it names.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
# Only ASCII blanks are trimmed: str.strip() would also drop U+2028, U+0085 and the like,
# hiding them from the check above.
_BLANKS = " \t\n\r\f\v"
_PERCENT_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")
# Spellings fsspec treats as the same filesystem; folding them keeps one key per file.
_SCHEME_ALIASES = {"s3a": "s3", "gcs": "gs", "local": "file"}
# The extra of this package that installs the fsspec implementation a scheme needs (pyproject's
# optional dependencies): a refusal names it rather than the bare library.
EXTRAS: Mapping[str, str] = {
    "s3": "s3",
    "s3a": "s3",
    "http": "http",
    "https": "http",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
}
# Schemes whose authority is a DNS host (case-insensitive), with their default ports. Other
# schemes keep the authority as given: for s3/gs it is a bucket, for memory:// it is a path.
_HOST_SCHEMES: Mapping[str, int | None] = {
    "http": 80,
    "https": 443,
    "ftp": 21,
    "sftp": 22,
    "ssh": 22,
    "smb": 445,
    "webhdfs": None,
}


# A URL already in canonical form: a lower-case scheme whose authority is not a DNS host, then
# only characters no rule below changes (no escape, port, userinfo, query, fragment, control
# character). Object names listed from a bucket are nearly all such: a scan of 100,000 of them
# skips urlsplit and the checks (about 40 us each) and stays close to the listing's own time.
_CANONICAL = re.compile(r"([a-z][a-z0-9+.-]*)://[A-Za-z0-9._~/=+,-]*")


def normalize(raw: str, *, base: pathlib.Path | None = None) -> str:
    """The canonical URL of a local path or URL; raises InvalidURL with the reason."""
    if (
        (match := _CANONICAL.fullmatch(raw))
        and len(raw) <= MAX_URL_LENGTH
        and "::" not in raw
        and (scheme := match.group(1)) not in _HOST_SCHEMES
        and scheme not in _SCHEME_ALIASES
        and scheme != "file"
        and _filesystem_problem(scheme) is None
    ):
        return raw
    return _normalize(raw, base)


def _normalize(raw: str, base: pathlib.Path | None) -> str:
    text = raw.strip(_BLANKS)
    if not text:
        raise _refuse(raw, "empty URL")
    _check_control(raw, text)
    if _SCHEME_URL.match(text) and masking.has_userinfo(text):
        raise _refuse(
            _hide_userinfo(text),
            "URL carries credentials (user:password@); give them as fsspec storage options "
            "or configuration (environment, ~/.config/fsspec), not in the URL",
        )
    if _FILE_URL.match(text):
        url = _local_url(_file_url_path(raw, text))
    elif match := _SCHEME_URL.match(text):
        # fsspec splits a URL at every "::" into a chain (even inside "[::1]"), so such a URL
        # would not name the file it spells.
        if "::" in text:
            raise _refuse(raw, "contains '::', which fsspec reads as a chain of URLs")
        url = _remote_url(raw, text, match.group(1).lower())
    elif any(_SCHEME_URL.match(part) for part in text.split("::")[1:]):
        raise _refuse(raw, "chained fsspec URLs ('proto::url') are not supported")
    else:
        # Any other "::" is part of a local file name; filesystem() never lets fsspec chain it.
        url = _local_url(_absolute(os.path.expanduser(text), base))
    if len(url) > MAX_URL_LENGTH:
        raise _refuse(
            raw, f"longer than {MAX_URL_LENGTH} characters after normalisation ({len(url)})"
        )
    return url


def iter_normalized(
    lines: Iterable[str], *, base: pathlib.Path | None = None
) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number from 1, url or None, reason or None) per input line; never raises InvalidURL."""
    for number, line in enumerate(lines, start=1):
        text = line.strip(_BLANKS)
        if not text:
            yield number, None, "empty line"
            continue
        try:
            yield number, normalize(text, base=base), None
        except InvalidURL as exc:
            yield number, None, str(exc.data.get("reason", exc))


def fingerprint(url: str) -> str | None:
    """The content fingerprint seen at submit: the ETag, else `size:mtime`; None if unreadable."""
    try:
        fs, path = filesystem(url)
        info = fs.info(path)
        return fingerprint_from_info(info)
    # Submit must go on whatever the backend raises (missing file, no credentials, network):
    # without a fingerprint the row is still registered, only change detection is lost.
    except Exception:
        return None


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and path for a URL (or a plain local path), without `::` chaining."""
    if _FILE_URL.match(url):
        return fsspec.filesystem("file"), local_path(url)
    if _SCHEME_URL.match(url):
        fs, path = fsspec.core.url_to_fs(url)
        return fs, str(path)
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(url))


def local_path(url: str) -> str:
    """The decoded local path of a `file:` URL (fsspec itself would keep `%20` literally)."""
    parts = urllib.parse.urlsplit(url)
    return os.fsdecode(urllib.parse.unquote_to_bytes(parts.path))


# -- helpers ---------------------------------------------------------------------------------


def _refuse(raw: str, reason: str) -> InvalidURL:
    raw = masking.scrub(raw)
    shown = raw if len(raw) <= 120 else raw[:117] + "..."
    return InvalidURL(f"{reason}: {shown!r}", url=raw, reason=reason)


def _hide_userinfo(text: str) -> str:
    """`scheme://***@rest`: the user name of a file URL may itself be a key (S3's)."""
    scheme, _, rest = text.partition("://")
    return f"{scheme}://{masking.MASK}@{rest.rpartition('@')[2]}"


def _split(raw: str, text: str) -> urllib.parse.SplitResult:
    # urlsplit raises ValueError on a malformed bracketed host ("x://[/a]", "x://[y]/a").
    try:
        return urllib.parse.urlsplit(text)
    except ValueError as error:
        raise _refuse(raw, f"not a valid URL ({error})") from None


def _check_control(raw: str, text: str) -> None:
    if found := _CONTROL.search(text):
        code = ord(found.group())
        name = f"0x{code:02x}" if code < 0xA0 else f"U+{code:04X}"
        raise _refuse(raw, f"contains a control character ({name}) at {found.start()}")


def _file_url_path(raw: str, text: str) -> str:
    """The absolute local path named by a `file:` URL."""
    parts = _split(raw, text)
    # RFC 8089: an empty authority or "localhost" is this machine; any other host is not local.
    if parts.netloc and parts.netloc.lower() != "localhost":
        raise _refuse(
            raw, f"file URL names host {parts.netloc!r}; write file:///absolute/path instead"
        )
    if parts.query or parts.fragment:
        raise _refuse(raw, "file URL has a query or fragment; percent-encode '?' and '#'")
    path = local_path(text)
    if not path:
        raise _refuse(raw, "file URL has no path")
    if not path.startswith("/"):
        raise _refuse(raw, "file URL path is not absolute")
    # A percent-encoded control character is the same file as the raw one, refused the same way.
    _check_control(raw, path)
    return path


def _absolute(path: str, base: pathlib.Path | None) -> str:
    """Join onto base (or the cwd) and resolve `.`/`..` lexically: symlinks are not followed."""
    if base is not None:
        path = os.path.join(os.path.abspath(os.path.expanduser(base)), path)
    return os.path.abspath(path)


def _local_url(path: str) -> str:
    path = os.path.normpath(path)
    # POSIX lets normpath keep a leading "//"; on Linux it is the same directory as "/".
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    # Encoded exactly as pathlib's as_uri() does, so the two always agree.
    return "file://" + urllib.parse.quote_from_bytes(os.fsencode(path))


def _remote_url(raw: str, text: str, scheme: str) -> str:
    scheme = _SCHEME_ALIASES.get(scheme, scheme)
    parts = _split(raw, text)
    netloc, path, query = parts.netloc, parts.path, parts.query
    if not netloc and scheme in _HOST_SCHEMES:
        raise _refuse(raw, "URL has no host")
    if scheme in _HOST_SCHEMES:
        netloc = _host_netloc(raw, parts, _HOST_SCHEMES[scheme])
    if scheme in ("http", "https"):
        path = _upper_escapes(path) or "/"
        query = _upper_escapes(query)
    if problem := _filesystem_problem(scheme):
        raise _refuse(raw, problem)
    # Built by hand: urlunsplit drops the "//" of an empty authority ("memory:///a").
    url = f"{scheme}://{netloc}{path}"
    if query:
        url += f"?{query}"
    if parts.fragment:
        url += f"#{parts.fragment}"
    return url


def _host_netloc(raw: str, parts: urllib.parse.SplitResult, default_port: int | None) -> str:
    """user:password@host:port with the host lower-cased and a default port dropped."""
    try:
        port = parts.port
    except ValueError:
        raise _refuse(raw, "invalid port") from None
    host = parts.hostname or ""
    if not host:
        raise _refuse(raw, "URL has no host")
    if ":" in host:  # IPv6 literal: urlsplit dropped the brackets
        host = f"[{host}]"
    userinfo, at, _ = parts.netloc.rpartition("@")
    netloc = f"{userinfo}{at}{host}"
    if port is not None and port != default_port:
        netloc += f":{port}"
    return netloc


def _upper_escapes(text: str) -> str:
    # RFC 3986 6.2.2.1: %2f and %2F are the same octet.
    return _PERCENT_ESCAPE.sub(lambda m: m.group().upper(), text)


@functools.cache
def _filesystem_problem(scheme: str) -> str | None:
    """Why no installed fsspec filesystem serves the scheme, or None when one does."""
    # Cached: a refused scheme would otherwise retry a failing import for every URL.
    extra = EXTRAS.get(scheme)
    try:
        fsspec.get_filesystem_class(scheme)
    except (ValueError, ImportError) as exc:
        # fsspec may not know a scheme until its package registers it (adlfs adds abfss):
        # either way what is missing is the extra.
        if extra:
            return (
                f"scheme {scheme!r} needs the {extra} extra: "
                f"pip install 'pipeline-exactly-once[{extra}]'"
            )
        if isinstance(exc, ValueError):
            return f"no fsspec filesystem serves scheme {scheme!r}"
        # fsspec's message names the package to install, e.g. "Install s3fs to access S3".
        return f"scheme {scheme!r} needs a package that is not installed ({exc})"
    return None


def scheme_problem(url: str) -> str | None:
    """Why no installed filesystem serves the URL's scheme (naming the extra), or None."""
    match = _SCHEME_URL.match(url)
    if match is None or _FILE_URL.match(url):
        return None
    scheme = match.group(1).lower()
    return _filesystem_problem(_SCHEME_ALIASES.get(scheme, scheme))


def fingerprint_from_info(info: Mapping[str, Any]) -> str | None:
    if info.get("type") == "directory":
        return None
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag)
    size = info.get("size")
    # mtime: local and most filesystems; LastModified: s3fs without an ETag; Last-Modified: the
    # HTTP header as fsspec's HTTPFileSystem passes it on (RFC 7231 date).
    mtime = _timestamp(
        info.get("mtime")
        or info.get("LastModified")
        or info.get("Last-Modified")
        or info.get("created")
    )
    if mtime is None:
        return None
    if size is None:
        if info.get("Last-Modified") is None:
            return None
        # A chunked HTTP response has no length: the date alone still tells a change.
        size = "-"
    return f"{size}:{mtime:.6f}".rstrip("0").rstrip(".")


def _timestamp(value: object) -> float | None:
    """Seconds since the epoch from a number, a datetime, an ISO 8601 or an HTTP date."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            value = dt.datetime.fromisoformat(text)
        except ValueError:
            try:  # an HTTP date: "Tue, 01 Dec 2026 10:00:00 GMT"
                value = email.utils.parsedate_to_datetime(text)
            except (TypeError, ValueError):
                return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.timestamp()
    return None


__all__ = [
    "MAX_URL_LENGTH",
    "filesystem",
    "fingerprint",
    "iter_normalized",
    "local_path",
    "normalize",
]
