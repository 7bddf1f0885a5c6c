"""The ledger's immutable values: what its methods return.

All are frozen, slotted dataclasses: safe to share between tasks and threads,
hashable, and never a live view of the database (a value is the state at the
moment its transaction committed). Timestamps are ISO-8601 UTC strings with
millisecond precision and a ``Z`` suffix, the same format as the server's store.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, cast

__all__ = [
    "Balance",
    "Entry",
    "EntryKind",
    "LedgerStatistics",
    "Reservation",
    "ReservationStatus",
    "Settlement",
    "entry_from_row",
    "now_iso",
    "reservation_from_row",
]

EntryKind = Literal["allocation", "charge", "refund"]
ReservationStatus = Literal["open", "settled", "released"]


def now_iso() -> str:
    """The current UTC time as ``2024-05-01T12:00:00.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Balance:
    """One account's credits. Invariant: ``available == balance - reserved >= 0``."""

    account_id: str
    balance: int
    reserved: int
    available: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of an account's history; entries are never updated or deleted.

    ``amount`` is signed: ``allocation`` and ``refund`` are > 0, ``charge`` < 0.
    Invariant: an account's ``balance == sum(entry.amount)``.
    ``reservation_id`` names the reservation a ``charge`` settled (else None).
    """

    id: int
    account_id: str
    kind: EntryKind
    amount: int
    model_id: str | None
    streaming_session_id: str | None
    reason: str | None
    input_tokens: int
    output_tokens: int
    created_at: str
    reservation_id: str | None = None


@dataclass(frozen=True, slots=True)
class Reservation:
    """Credits held for one call's worst case until it is settled or released.

    ``status`` goes ``open`` -> ``settled`` | ``released`` exactly once.
    ``holder`` is the opaque id of the process that made it (see ``recover``).
    """

    id: str
    account_id: str
    amount: int
    model_id: str | None
    streaming_session_id: str | None
    status: ReservationStatus
    created_at: str
    holder: str | None = None

    @classmethod
    def new(
        cls,
        account_id: str,
        credits: int,
        model_id: str | None,
        streaming_session_id: str | None,
        holder: str | None,
    ) -> Reservation:
        """An open reservation with a fresh id, made now (not yet stored)."""
        return cls(
            f"res_{uuid.uuid4().hex}",
            account_id,
            credits,
            model_id,
            streaming_session_id,
            "open",
            now_iso(),
            holder,
        )


@dataclass(frozen=True, slots=True)
class Settlement:
    """The outcome of settling a reservation: ``charged + released == reservation.amount``.

    ``entry`` is the ``charge`` entry written, or None when nothing was charged.
    """

    reservation_id: str
    charged: int
    released: int
    entry: Entry | None


@dataclass(frozen=True, slots=True)
class LedgerStatistics:
    """A consistent snapshot of the whole ledger (like trio's ``MemoryChannelStatistics``).

    ``allocations_total``, ``charges_total`` and ``refunds_total`` are credit
    sums (all positive); ``settled_total`` and ``released_total`` count the
    reservations closed each way. Invariant: the sum of all balances is
    ``allocations_total - charges_total + refunds_total``.
    """

    accounts: int
    entries: int
    open_reservations: int
    reserved_credits: int
    allocations_total: int
    charges_total: int
    settled_total: int
    released_total: int
    refunds_total: int = 0


# Column lists matching the converters below; both backends select exactly these.
ENTRY_COLUMNS = (
    "id, account_id, kind, amount, model_id, streaming_session_id, reason,"
    " input_tokens, output_tokens, created_at, reservation_id"
)
RESERVATION_COLUMNS = (
    "id, account_id, amount, model_id, streaming_session_id, status, created_at, holder"
)


def entry_from_row(row: Sequence[object]) -> Entry:
    """Build an :class:`Entry` from a row selected with :data:`ENTRY_COLUMNS`."""
    (
        id_,
        account_id,
        kind,
        amount,
        model_id,
        streaming_session_id,
        reason,
        input_tokens,
        output_tokens,
        created_at,
        reservation_id,
    ) = tuple(row)
    return Entry(
        id=cast(int, id_),
        account_id=cast(str, account_id),
        kind=cast(EntryKind, kind),
        amount=cast(int, amount),
        model_id=cast("str | None", model_id),
        streaming_session_id=cast("str | None", streaming_session_id),
        reason=cast("str | None", reason),
        input_tokens=cast(int, input_tokens),
        output_tokens=cast(int, output_tokens),
        created_at=cast(str, created_at),
        reservation_id=cast("str | None", reservation_id),
    )


def reservation_from_row(row: Sequence[object]) -> Reservation:
    """Build a :class:`Reservation` from a row selected with :data:`RESERVATION_COLUMNS`."""
    id_, account_id, amount, model_id, streaming_session_id, status, created_at, holder = tuple(row)
    return Reservation(
        id=cast(str, id_),
        account_id=cast(str, account_id),
        amount=cast(int, amount),
        model_id=cast("str | None", model_id),
        streaming_session_id=cast("str | None", streaming_session_id),
        status=cast(ReservationStatus, status),
        created_at=cast(str, created_at),
        holder=cast("str | None", holder),
    )
