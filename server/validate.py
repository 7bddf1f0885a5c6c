"""Request parsing: JSON bodies, fields, pagination — failing as clear 400s.

Every check raises :class:`server.errors.ValidationError` (or a more
specific :class:`ApiError`) *before* anything is stored or reserved.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

from quart import request

from .errors import ValidationError
from .store import Page

MAX_INT = 2**53


async def json_body(*, allow_empty: bool = False) -> dict[str, Any]:
    """The request's JSON object; malformed JSON or a non-object → 400."""
    raw = await request.get_data(as_text=False)
    if not raw.strip():
        if allow_empty:
            return {}
        raise ValidationError("A JSON body is required.")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValidationError("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ValidationError("The JSON body must be an object.")
    return body


def string(
    body: Mapping[str, Any],
    name: str,
    *,
    required: bool = False,
    max_len: int | None = None,
    min_len: int = 0,
    not_blank: bool = False,
) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ValidationError(f"'{name}' is required.", details=[{"field": name}])
        return None
    if not isinstance(value, str):
        raise ValidationError(f"'{name}' must be a string.", details=[{"field": name}])
    if not_blank and not value.strip():
        raise ValidationError(f"'{name}' must not be blank.", details=[{"field": name}])
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        raise ValidationError(
            f"'{name}' must be {min_len} to {max_len} characters.", details=[{"field": name}]
        )
    return value


def integer(
    body: Mapping[str, Any],
    name: str,
    *,
    required: bool = False,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ValidationError(f"'{name}' is required.", details=[{"field": name}])
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"'{name}' must be an integer.", details=[{"field": name}])
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValidationError(
            f"'{name}' must be between {minimum} and {maximum}.", details=[{"field": name}]
        )
    return value


def number(body: Mapping[str, Any], name: str, *, minimum: float, maximum: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValidationError(f"'{name}' must be a number.", details=[{"field": name}])
    if not minimum <= value <= maximum:
        raise ValidationError(
            f"'{name}' must be between {minimum} and {maximum}.", details=[{"field": name}]
        )
    return float(value)


_DIGITS = re.compile(r"^[0-9]{1,32}$")


def client_id(value: Any) -> str:
    """A client-chosen session id: a UUID or digits (SPEC §4)."""
    if isinstance(value, str):
        if _DIGITS.match(value):
            return value
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    raise ValidationError("'id' must be a UUID or digits.", details=[{"field": "id"}])


def _query_int(name: str, default: int, minimum: int, maximum: int | None) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", raw.strip()):
        raise ValidationError(f"'{name}' must be a positive integer.", details=[{"field": name}])
    value = int(raw)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f" and at most {maximum}" if maximum is not None else ""
        raise ValidationError(
            f"'{name}' must be at least {minimum}{bound}.", details=[{"field": name}]
        )
    return value


def pagination() -> tuple[int, int, Page]:
    """``page`` (1-based, default 1) and ``limit`` (default 20, max 100), SPEC §2."""
    page = _query_int("page", 1, 1, None)
    limit = _query_int("limit", 20, 1, 100)
    return page, limit, Page(offset=(page - 1) * limit, limit=limit)


def paginated(key: str, items: list[Any], total: int, page: int, limit: int) -> dict[str, Any]:
    total_pages = (total + limit - 1) // limit
    return {
        key: items,
        "pagination": {
            "page": page,
            "limit": limit,
            "total": total,
            "totalPages": total_pages,
            "hasNext": page < total_pages,
        },
    }
