"""The ledger's error family, and the one place SQLite's integrity errors are mapped.

Every error the ledger raises on purpose is a :class:`LedgerError`. Each class
has a stable ``code`` (an UPPER_SNAKE string) so the HTTP layer can translate
the whole family in one place. Each error carries its context as attributes
and as its constructor arguments, so it pickles and ``str(exc)`` is a plain
human sentence with no internal detail.

A rejected operation never changes the ledger: every error is raised before
(or rolls back) the transaction that would have moved credits.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

__all__ = [
    "IdempotencyConflict",
    "InsufficientCredits",
    "InvalidAmount",
    "LedgerError",
    "ReservationClosed",
    "UnknownAccount",
    "UnknownReservation",
    "map_integrity_errors",
]


class LedgerError(Exception):
    """Base of every error the ledger raises.

    Raised bare only when the database refused a write the ledger's own checks
    had let through (a broken invariant, or a foreign writer in our tables):
    code ``INTERNAL_ERROR``. Nothing is committed in that case.
    """

    code: ClassVar[str] = "INTERNAL_ERROR"


class InsufficientCredits(LedgerError):
    """``available`` is less than ``needed``; nothing was reserved."""

    code: ClassVar[str] = "INSUFFICIENT_CREDITS"

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(needed, available)
        self.needed = needed
        self.available = available

    def __str__(self) -> str:
        return f"insufficient credits: {self.needed} needed, {self.available} available"


class UnknownAccount(LedgerError):
    """No ledger account has this id (see :meth:`Ledger.open_account`)."""

    code: ClassVar[str] = "ACCOUNT_NOT_FOUND"

    def __init__(self, account_id: str) -> None:
        super().__init__(account_id)
        self.account_id = account_id

    def __str__(self) -> str:
        return f"unknown ledger account {self.account_id!r}"


class UnknownReservation(LedgerError):
    """No reservation has this id."""

    code: ClassVar[str] = "RESERVATION_NOT_FOUND"

    def __init__(self, reservation_id: str) -> None:
        super().__init__(reservation_id)
        self.reservation_id = reservation_id

    def __str__(self) -> str:
        return f"unknown reservation {self.reservation_id!r}"


class IdempotencyConflict(LedgerError):
    """The idempotency key was already used on this account with another amount."""

    code: ClassVar[str] = "IDEMPOTENCY_CONFLICT"

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"idempotency key {self.key!r} was already used with a different amount"


class ReservationClosed(LedgerError):
    """The reservation was already settled or released: each closes exactly once."""

    code: ClassVar[str] = "RESERVATION_CLOSED"

    def __init__(self, reservation_id: str, status: str | None = None) -> None:
        super().__init__(reservation_id, status)
        self.reservation_id = reservation_id
        self.status = status

    def __str__(self) -> str:
        how = f" (already {self.status})" if self.status else ""
        return f"reservation {self.reservation_id!r} is closed{how}"


class InvalidAmount(LedgerError):
    """A credit amount, token count or page bound is not an acceptable integer."""

    code: ClassVar[str] = "VALIDATION_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@contextmanager
def map_integrity_errors() -> Iterator[None]:
    """Translate :class:`sqlite3.IntegrityError` into :class:`LedgerError`.

    The ledger checks every rule itself before writing; the schema's CHECK,
    UNIQUE and FOREIGN KEY constraints are the second line of defence. If one
    fires, the caller's transaction rolls back and the caller sees a
    ``LedgerError`` (code ``INTERNAL_ERROR``), never a raw ``sqlite3`` error.
    """
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise LedgerError(f"ledger integrity constraint refused the write: {exc}") from exc
