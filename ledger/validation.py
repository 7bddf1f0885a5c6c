"""Argument checks shared by the ledger and the pricing: integers, in range.

Credits, token counts and page bounds are plain ``int`` (``bool`` is refused
even though it is an ``int`` subclass: ``allocate(u, True)`` is a bug, not one
credit). Every amount is at most :data:`MAX_CREDITS` = 2**53, the largest
integer a JSON number carries exactly, so no value the ledger stores or
returns is ever rounded by a JavaScript client.
"""

from __future__ import annotations

from typing import TypeGuard

from .errors import InvalidAmount

__all__ = ["MAX_CREDITS", "require_count", "require_credits", "require_id"]

MAX_CREDITS = 2**53


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def require_credits(name: str, value: object, *, allow_zero: bool = False) -> int:
    """Return ``value`` if it is an int in ``(0, MAX_CREDITS]`` (``[0, …]`` with ``allow_zero``)."""
    low = 0 if allow_zero else 1
    if not _is_int(value) or not low <= value <= MAX_CREDITS:
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidAmount(f"{name} must be an integer {bound} and <= 2**53, got {value!r}")
    return value


def require_count(name: str, value: object) -> int:
    """Return ``value`` if it is an int in ``[0, MAX_CREDITS]`` (tokens, offsets, limits)."""
    if not _is_int(value) or not 0 <= value <= MAX_CREDITS:
        raise InvalidAmount(f"{name} must be a non-negative integer, got {value!r}")
    return value


def require_id(name: str, value: object) -> str:
    """Return ``value`` if it is a non-empty ``str`` (account ids, reservation ids)."""
    if not isinstance(value, str) or not value:
        raise InvalidAmount(f"{name} must be a non-empty string, got {value!r}")
    return value
