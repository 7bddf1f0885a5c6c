"""The ledger's row-level statements, each run inside the caller's transaction.

None of these begins or commits: :class:`ledger.Ledger` opens one
``BEGIN IMMEDIATE`` transaction per operation and calls several of these in
it, so each operation's reads and writes commit (or roll back) together.
Every function that changes a cached column on ``ledger_accounts`` states the
invariant it keeps.
"""

from __future__ import annotations

import sqlite3

from .errors import InvalidAmount, ReservationClosed, UnknownAccount, UnknownReservation
from .validation import MAX_CREDITS
from .values import (
    RESERVATION_COLUMNS,
    Balance,
    Entry,
    EntryKind,
    Reservation,
    ReservationStatus,
    now_iso,
    reservation_from_row,
)

__all__ = ["close_reservation", "credit", "insert_entry", "load_open_reservation", "read_balance"]


def read_balance(conn: sqlite3.Connection, account_id: str) -> Balance:
    """The cached columns of one account, or :class:`UnknownAccount`."""
    row = conn.execute(
        "SELECT balance, reserved FROM ledger_accounts WHERE account_id = ?", (account_id,)
    ).fetchone()
    if row is None:
        raise UnknownAccount(account_id)
    balance, reserved = row
    return Balance(account_id, balance, reserved, balance - reserved)


def credit(conn: sqlite3.Connection, current: Balance, credits: int) -> None:
    """Raise the balance by ``credits``; :class:`InvalidAmount` past 2**53."""
    if current.balance + credits > MAX_CREDITS:
        raise InvalidAmount(
            f"balance of {current.account_id!r} would exceed 2**53 ({current.balance} + {credits})"
        )
    # Invariant: balance == sum(entries.amount); the caller writes the entry.
    conn.execute(
        "UPDATE ledger_accounts SET balance = balance + ? WHERE account_id = ?",
        (credits, current.account_id),
    )


def insert_entry(
    conn: sqlite3.Connection,
    account_id: str,
    kind: EntryKind,
    amount: int,
    *,
    model_id: str | None = None,
    streaming_session_id: str | None = None,
    reason: str | None = None,
    input_tokens: int = 0,
    output_tokens: int = 0,
    reservation_id: str | None = None,
    idempotency_key: str | None = None,
) -> Entry:
    """Append one entry (entries are never updated) and return it."""
    created_at = now_iso()
    cursor = conn.execute(
        "INSERT INTO ledger_entries (account_id, kind, amount, model_id, streaming_session_id,"
        " reason, input_tokens, output_tokens, reservation_id, idempotency_key, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            account_id,
            kind,
            amount,
            model_id,
            streaming_session_id,
            reason,
            input_tokens,
            output_tokens,
            reservation_id,
            idempotency_key,
            created_at,
        ),
    )
    assert cursor.lastrowid is not None
    return Entry(
        id=cursor.lastrowid,
        account_id=account_id,
        kind=kind,
        amount=amount,
        model_id=model_id,
        streaming_session_id=streaming_session_id,
        reason=reason,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        created_at=created_at,
        reservation_id=reservation_id,
    )


def load_open_reservation(conn: sqlite3.Connection, reservation_id: str) -> Reservation:
    """The reservation if open, else :class:`ReservationClosed` (or :class:`UnknownReservation`)."""
    row = conn.execute(
        f"SELECT {RESERVATION_COLUMNS} FROM ledger_reservations WHERE id = ?",
        (reservation_id,),
    ).fetchone()
    if row is None:
        raise UnknownReservation(reservation_id)
    reservation = reservation_from_row(row)
    if reservation.status != "open":
        raise ReservationClosed(reservation_id, reservation.status)
    return reservation


def close_reservation(
    conn: sqlite3.Connection, reservation: Reservation, status: ReservationStatus, charged: int
) -> None:
    """Mark an open reservation settled/released and give back its hold."""
    # Exactly once: the status guard holds even if the caller's check raced
    # (it cannot, under BEGIN IMMEDIATE; the guard makes that visible).
    cursor = conn.execute(
        "UPDATE ledger_reservations SET status = ?, charged = ?, closed_at = ?"
        " WHERE id = ? AND status = 'open'",
        (status, charged, now_iso(), reservation.id),
    )
    if cursor.rowcount != 1:
        raise ReservationClosed(reservation.id)
    # Invariant: reserved == sum(open reservations); balance == sum(entries.amount).
    conn.execute(
        "UPDATE ledger_accounts SET reserved = reserved - ?, balance = balance - ?"
        " WHERE account_id = ?",
        (reservation.amount, charged, reservation.account_id),
    )
