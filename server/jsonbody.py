"""A request's JSON body, read once and refused as a clear 400 if no route should see it.

:func:`json_body` is the one place request bodies are read (the declared
fields of :mod:`server.validate` parse what it returns). Everything it lets
through can be stored and every number in it is finite.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from quart import g, request

from .errors import ValidationError

#: How deeply a JSON body may nest: ``{"a": [1]}`` is 2 levels. Every body
#: chinwag reads is a few levels deep (a batch item's body: 4); a deeper one
#: is refused before any field is looked at.
MAX_DEPTH = 32

# Text no column can store. A UTF-16 surrogate is no character on its own: JSON's
# escape syntax allows a lone "\ud800", but no UTF-8 text (so no SQLite column)
# can hold it; a pair escape decodes to one character, so any surrogate left in
# a str is lone. NUL ("\u0000") is a character, but PostgreSQL's text cannot
# hold it, so no backend takes it.
UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
# Both kinds of bracket as one, and every other byte dropped.
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


async def json_body(*, allow_empty: bool = False) -> dict[str, Any]:
    """The request's JSON object, or a 400 ``VALIDATION_ERROR`` before anything uses it.

    Refused: malformed JSON, ``NaN``/``Infinity`` (not JSON), a body that is not
    an object, nesting deeper than :data:`MAX_DEPTH` (also far deeper than
    ``json.loads`` can recurse), a number too large for a float (``1e400``), and
    text that is not Unicode (a lone surrogate escape, in a value or a key) or
    holds a NUL character.
    ``details`` names the field where there is one: the top-level key for
    nesting, else the value's path, as ``requests[0].body.title``. So every
    string a route gets can be stored and every number is finite. This is the
    one place request bodies are read.
    """
    raw = await request.get_data(as_text=False)
    g.body_read = True
    if not raw.strip():
        if allow_empty:
            return {}
        raise ValidationError("A JSON body is required.")
    body = _parse(raw)
    if not isinstance(body, dict):
        raise ValidationError("The JSON body must be an object.")
    _check_values(body)
    return body


def _parse(raw: str | bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise _too_deep(None) from None
    except (ValueError, UnicodeDecodeError):  # also a 5,000-digit integer
        raise ValidationError("The body is not valid JSON.") from None


def _not_json(name: str) -> Any:
    raise ValidationError(f"The body is not valid JSON ({name} is not a JSON number).")


def _too_deep(field: str | None) -> ValidationError:
    return ValidationError(
        f"The JSON body nests deeper than {MAX_DEPTH} levels.",
        details=[{"field": field}] if field else None,
    )


def _check_values(body: dict[str, Any]) -> None:
    """Refuse nesting past MAX_DEPTH, infinite numbers, lone surrogates and NULs.

    At C speed, never recursing in Python: one encoding of the body, then str
    and bytes operations on it (measured: for a 1 MB body, about what
    ``json.loads`` took). Only a refused body is walked, to name the field.
    """
    text = _encode(body)
    structure = _structure(text)
    if _depth(structure) > MAX_DEPTH:
        raise _too_deep(_deep_key(body))
    if b"Infinity" in structure or UNSTORABLE.search(text):
        _name_bad_scalar(body)


def _encode(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, check_circular=False)
    except RecursionError:  # as deep as json.loads could go
        raise _too_deep(None) from None


def _structure(text: str) -> bytes:
    """Encoded JSON without its strings: brackets, numbers, literals, punctuation."""
    # In encoded JSON a backslash always starts a two-character escape, so with
    # "\\\\" then '\\"' dropped, quotes are left only where strings start and end.
    unescaped = text.replace("\\\\", "").replace('\\"', "")
    return "".join(unescaped.split('"')[::2]).encode("utf-8", "surrogatepass")


def _depth(structure: bytes) -> int:
    """How deeply ``structure`` nests, counting up to ``MAX_DEPTH + 1``."""
    brackets = structure.translate(_BRACKETS, _NOT_BRACKETS)
    depth = 0
    while brackets and depth <= MAX_DEPTH:
        brackets = brackets.replace(b"[]", b"")  # the innermost level goes
        depth += 1
    return depth


def _deep_key(body: dict[str, Any]) -> str | None:
    """The top-level key whose value nests too deeply (the body is level 1)."""
    for key, value in body.items():
        if isinstance(value, dict | list) and _depth(_structure(_encode(value))) >= MAX_DEPTH:
            return key
    return None


# A value's place in the body, built only when an error names it: (parent, key).
_Path = tuple[Any, str | int] | None


def _name_bad_scalar(body: dict[str, Any]) -> None:
    """Raise for the first unstorable text (in a value or a key) or infinite number."""
    stack: list[tuple[dict[str, Any] | list[Any], _Path]] = [(body, None)]
    while stack:
        container, path = stack.pop()
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, value in items:
            if isinstance(key, str) and UNSTORABLE.search(key):
                raise ValidationError(
                    "A key in the JSON body is not valid Unicode text (or holds a NUL).",
                    details=[{"field": _render(path)}] if path else None,
                )
            if isinstance(value, dict | list):
                stack.append((value, (path, key)))
            elif isinstance(value, str) and UNSTORABLE.search(value):
                raise not_text(_render((path, key)))
            elif isinstance(value, float) and math.isinf(value):
                field = _render((path, key))
                raise ValidationError(f"'{field}' is out of range.", details=[{"field": field}])


def not_text(field: str) -> ValidationError:
    return ValidationError(
        f"'{field}' must be valid Unicode text without NUL characters "
        "(a lone surrogate such as \\ud800 is not a character; \\u0000 cannot be stored).",
        details=[{"field": field}],
    )


def _render(path: _Path) -> str:
    """A value's path as ``requests[0].body.title``."""
    keys: list[str | int] = []
    while path is not None:
        path, key = path
        keys.append(key)
    out = ""
    for key in reversed(keys):
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out
