"""Database targets: which backend a string names, and how to print one safely.

No driver is imported here: deciding that ``postgresql://…`` means PostgreSQL
must not cost the SQLite default an import of psycopg.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, quote, unquote, unquote_plus, urlencode, urlsplit, urlunsplit

__all__ = ["InvalidDatabaseUrl", "is_postgres_url", "mask_url", "password_of", "scrub"]

_SCHEMES = ("postgresql://", "postgres://")
_MASK = "***"


class InvalidDatabaseUrl(ValueError):
    """A database URL the driver cannot parse (its text masked: :func:`scrub`)."""


def is_postgres_url(target: str | os.PathLike[str]) -> bool:
    """True for ``postgresql://…`` (or ``postgres://…``); anything else is a SQLite path."""
    return isinstance(target, str) and target.lower().startswith(_SCHEMES)


def _split_userinfo(url: str) -> tuple[str, str | None, str] | None:
    """``(before, userinfo, after)`` of a ``scheme://userinfo@host…`` URL, split
    as libpq reads one: the authority ends at the first ``/`` only, so a
    password may hold an unencoded ``?`` or ``#`` (``urlsplit`` would take
    those for the query or fragment and miss the password). The last ``@``
    before that ``/`` ends the user info. None when there is no ``://``;
    ``userinfo`` None when there is no ``@``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    cut = rest.find("/")
    head, tail = (rest, "") if cut < 0 else (rest[:cut], rest[cut:])
    if "@" not in head:
        return scheme + sep, None, rest
    userinfo, _, hostport = head.rpartition("@")
    return scheme + sep, userinfo, "@" + hostport + tail


def password_of(url: str) -> str | None:
    """The password a URL carries (in its user info or a ``password=`` parameter), if any."""
    split = _split_userinfo(url)
    if split is not None and split[1] is not None:
        _, has_password, password = split[1].partition(":")
        if has_password and password:
            return unquote(password)
    for key, value in parse_qsl(_query(url), keep_blank_values=True):
        if key == "password" and value:
            return value
    return None


def _query(url: str) -> str:
    """The query of a URL, even one ``urlsplit`` refuses (an unclosed ``[``)."""
    return url.partition("?")[2].partition("#")[0]


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***``: the only form ever printed or logged.

    ``postgresql://chinwag:s3cret@db:5432/chinwag`` becomes
    ``postgresql://chinwag:***@db:5432/chinwag``; a ``password=`` query
    parameter is masked the same way. Never raises: a URL that does not parse
    is reduced to its scheme.
    """
    try:
        split = _split_userinfo(url)
        if split is not None and (userinfo := split[1]) is not None:
            before, _, after = split
            user, has_password, _ = userinfo.partition(":")
            url = before + (f"{user}:{_MASK}" if has_password else user) + after
        parts = urlsplit(url)
        netloc = parts.netloc
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode(
                [(k, _MASK if k == "password" else v) for k, v in pairs],
                quote_via=lambda value, *_: quote(value, safe="*"),
            )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return url.split(":", 1)[0] + "://" + _MASK


def scrub(text: str, url: str) -> str:
    """``text`` with the URL and every form of its password masked: decoded,
    %-encoded, and as written in the URL (any escapes, any case), since a
    driver may echo the connection string back as it was given.
    """
    if url:
        text = text.replace(url, mask_url(url))
    forms: set[str] = set()
    split = _split_userinfo(url)
    if split is not None and split[1] is not None:
        _, has_password, raw = split[1].partition(":")
        if has_password:
            forms |= {raw, unquote(raw)}
    for pair in _query(url).split("&"):
        key, _, raw = pair.partition("=")
        if unquote_plus(key) == "password":
            forms |= {raw, unquote_plus(raw)}
    forms |= {quote(form, safe="") for form in forms}
    for form in sorted(filter(None, forms), key=len, reverse=True):
        text = text.replace(form, _MASK)
    return text
