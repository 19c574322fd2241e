"""Secrets never printed: one way to show a database, broker or file URL, and to scrub text.

The password is found the way the connection itself finds it (SQLAlchemy's `make_url` for
database URLs, kombu's `url_to_parts` for broker URLs), and on top of that everything between
`://user:` and the last `@` is masked, a region that contains the password under either
parser (and under urllib's). A password holding `#`, `/`, `?`, `@` or `:` therefore never
survives, even where the two parsers would disagree on where it ends.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterator

MASK = "***"
# Schemes SQLAlchemy parses (its dialect names); every other URL is read as kombu reads it.
_DATABASE_SCHEMES = ("postgres", "postgresql", "sqlite", "mysql", "mariadb", "oracle", "mssql")
# scheme://user:SECRET@ where SECRET runs to the last "@": a superset of what any parser
# takes for the password. The user part stops at ":" and "/", as both parsers' does.
_USERINFO = re.compile(r"(?P<head>[\w+.\-]+://[^:/]*):(?P<secret>.*)@", re.DOTALL)
# The same inside free text (an error message): a URL ends at whitespace there.
_USERINFO_IN_TEXT = re.compile(r"(?P<head>[\w+.\-]+://[^:/\s]*):(?P<secret>\S*)@")
# Secrets shorter than this are not searched for in free text: replacing every "a" of a
# message would only garble it, and such a password is no secret anyway.
_MIN_SCRUBBED = 3


def mask_url(url: str | None) -> str:
    """The URL with any password replaced by ***, safe to print or log."""
    if not url:
        return "(not set)"
    shown = _USERINFO.sub(lambda m: f"{m.group('head')}:{MASK}@", _parsed_display(url))
    if any(len(secret) >= _MIN_SCRUBBED and secret in shown for secret in _secrets(url)):
        # Cannot happen with the region above; kept so that a parser change fails closed.
        scheme = url.partition("://")[0] if "://" in url else "url"
        return f"{scheme}://{MASK} (hidden: it may hold a password)"
    return shown


def mask_invalid_url(url: str | None) -> str:
    """How to name a URL that failed to parse: masked, or not at all when it has no
    `scheme://` (nothing then says where a password would be)."""
    if url and "://" not in url:
        return "(not shown: not a URL)"
    return mask_url(url)


def scrub(text: str, *urls: str | None) -> str:
    """`text` (an error message) with the given URLs masked, their passwords removed, and any
    other `scheme://user:password@` in it masked."""
    for url in urls:
        if not url:
            continue
        text = text.replace(url, mask_url(url))
        if "://" not in url:
            text = text.replace(url, mask_invalid_url(url))
        # Whole secrets first, then their pieces: a parser that cut the password at "#" or
        # "/" may quote a piece of it in its error ("Port could not be cast ... 'Pa55'").
        for secret in sorted(_secrets(url), key=len, reverse=True):
            for piece in (secret, *re.split(r"[#/?@:]", secret)):
                if len(piece) >= _MIN_SCRUBBED:
                    text = text.replace(piece, MASK)
    return _USERINFO_IN_TEXT.sub(lambda m: f"{m.group('head')}:{MASK}@", text)


_AZURE_SCHEMES = frozenset({"abfs", "abfss", "az", "adl", "wasb", "wasbs"})


def has_userinfo(url: str) -> bool:
    """Whether a URL's authority carries a user or password (`scheme://user:pw@...`)."""
    _, sep, rest = url.partition("://")
    if not sep:
        return False
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        # Azure spells the container there: abfss://container@account.dfs.core.windows.net/
        userinfo = authority.rpartition("@")[0]
        return not (url[: -len(rest) - 3].lower() in _AZURE_SCHEMES and ":" not in userinfo)
    # A password holding "/", "?" or "#" ends the authority early ("u:pa/ss@host"): what
    # follows a ":" there is then no port, and an "@" comes later.
    _, colon, after = authority.partition(":")
    return bool(colon) and "@" in rest and not after.isdigit()


def _parsed_display(url: str) -> str:
    """The URL as the database driver's parser renders it with the password hidden, or the
    URL itself (broker URLs: kombu's rendering would drop the query and the host of a URL
    it misparses, so the text as given is masked instead)."""
    if not url.lower().startswith(_DATABASE_SCHEMES):
        return url
    # The driver's own URL parser, so the mask matches what it would print; loaded only for
    # a database URL (its import costs a light command more than the rest of it).
    import sqlalchemy as sa
    from sqlalchemy import exc as sa_exc

    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except (sa_exc.ArgumentError, ValueError, TypeError):
        return url


def _secrets(url: str) -> Iterator[str]:
    """Every spelling of the password the parsers (and the masked region) find in `url`."""
    found: set[str] = set()
    if match := _USERINFO.search(url):
        found.add(match.group("secret"))
    if url.lower().startswith(_DATABASE_SCHEMES):
        import sqlalchemy as sa

        try:
            password = sa.make_url(url).password
        except Exception:  # an unparseable URL: the region above is all there is
            password = None
        if password:
            found.add(str(password))
    try:
        from kombu.utils.url import url_to_parts

        if password := url_to_parts(url).password:
            found.add(password)
    except Exception:  # kombu cannot parse it either: the region above is all there is
        pass
    for secret in list(found):
        found.update({urllib.parse.quote(secret, safe=""), urllib.parse.unquote(secret)})
    yield from (s for s in found if s)
