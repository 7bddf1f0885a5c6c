"""The ledger's error family. No database driver is imported here.

Every error the ledger raises on purpose is a :class:`LedgerError`. Each class
has a stable ``code`` (an UPPER_SNAKE string) so the HTTP layer can translate
the whole family in one place. Each error carries its context as attributes
and as its constructor arguments, so it pickles and ``str(exc)`` is a plain
human sentence with no internal detail (never a password).

A rejected operation never changes the ledger: every error is raised before
(or rolls back) the transaction that would have moved credits. Each backend
translates its driver's errors into this family at its own boundary
(:mod:`ledger.sqlite`, :mod:`ledger.postgres`), with ``raise … from exc``.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "IdempotencyConflict",
    "InsufficientCredits",
    "InvalidAmount",
    "LedgerError",
    "LedgerUnavailable",
    "ReservationClosed",
    "SchemaTooNew",
    "UnknownAccount",
    "UnknownReservation",
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
    """The idempotency key was already used on this account with another amount or reason."""

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


class LedgerUnavailable(LedgerError):
    """The ledger's database cannot be used right now; retry later (HTTP 503).

    Raised by the PostgreSQL backend when the database is unreachable, the
    connection was lost during the call, no pooled connection came free within
    the pool's timeout, or a row lock was not granted within the lock timeout.
    The call's transaction did not commit, with one exception stated by the
    backend: a connection lost *during* ``COMMIT`` leaves the outcome unknown
    (the transaction is then either wholly applied or wholly absent, never half).
    The message names the database by its masked URL, never its password.
    """

    code: ClassVar[str] = "SERVICE_UNAVAILABLE"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SchemaTooNew(LedgerError):
    """The database's ledger schema is newer than this code: refuse to touch it.

    Raised at open, before anything is read or written: an older release must
    not write rows a newer schema may interpret differently. Upgrade the code.
    """

    code: ClassVar[str] = "SCHEMA_TOO_NEW"

    def __init__(self, found: int, supported: int) -> None:
        super().__init__(found, supported)
        self.found = found
        self.supported = supported

    def __str__(self) -> str:
        return (
            f"ledger schema version {self.found} is newer than this code ({self.supported}):"
            " refusing to open it; upgrade chinwag"
        )
