"""The ledger's row-level statements, each run inside the caller's transaction.

Written once for both backends (see :mod:`ledger.tx`). None of these begins
or commits: :class:`ledger.core.SqlLedger` opens one transaction per operation
and calls several of these in it, so each operation's reads and writes commit
(or roll back) together. Every function that changes a cached column on
``ledger_accounts`` states the invariant it keeps.

Ordering matters on PostgreSQL, where a writer holds the account's row lock
from its first write of that row until COMMIT: each operation touches the
account row as late as it can, so a hot account is locked for as few round
trips as possible (one stream's reservation holds it for one statement and
the COMMIT).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from .errors import (
    InsufficientCredits,
    InvalidAmount,
    ReservationClosed,
    UnknownAccount,
    UnknownReservation,
)
from .tx import Tx, first
from .validation import MAX_CREDITS, require_count
from .values import (
    RESERVATION_COLUMNS,
    Balance,
    Entry,
    EntryKind,
    Reservation,
    ReservationStatus,
    Settlement,
    now_iso,
)

__all__ = [
    "Closed",
    "close_reservation",
    "credit",
    "hold",
    "insert_entry",
    "insert_reservation",
    "read_balance",
    "reservation_work",
    "return_hold",
    "settlement_work",
]


def read_balance(tx: Tx, account_id: str, *, lock: bool = False) -> Balance:
    """The cached columns of one account, or :class:`UnknownAccount`.

    ``lock=True``: the transaction is about to write this account, so read it
    under the row lock (``tx.lock_rows``): no other writer can change it
    before this transaction ends.
    """
    row = first(
        tx.execute(
            "SELECT balance, reserved FROM ledger_accounts WHERE account_id = ?"
            + (tx.lock_rows if lock else ""),
            (account_id,),
        )
    )
    if row is None:
        raise UnknownAccount(account_id)
    balance, reserved = int(row[0]), int(row[1])
    return Balance(account_id, balance, reserved, balance - reserved)


def credit(tx: Tx, current: Balance, credits: int) -> Balance:
    """Raise the balance by ``credits``; :class:`InvalidAmount` past 2**53.

    ``current`` must have been read with ``lock=True`` in this transaction.
    """
    if current.balance + credits > MAX_CREDITS:
        raise InvalidAmount(
            f"balance of {current.account_id!r} would exceed 2**53 ({current.balance} + {credits})"
        )
    # Invariant: balance == sum(entries.amount); the caller writes the entry.
    row = first(
        tx.execute(
            "UPDATE ledger_accounts SET balance = balance + ? WHERE account_id = ?"
            " RETURNING balance, reserved",
            (credits, current.account_id),
        )
    )
    balance, reserved = int(row[0]), int(row[1])
    return Balance(current.account_id, balance, reserved, balance - reserved)


def insert_entry(
    tx: Tx,
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
    row = first(
        tx.execute(
            "INSERT INTO ledger_entries (account_id, kind, amount, model_id, streaming_session_id,"
            " reason, input_tokens, output_tokens, reservation_id, idempotency_key, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
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
    )
    return Entry(
        id=int(row[0]),
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


def insert_reservation(tx: Tx, reservation: Reservation) -> None:
    """Insert an open reservation row; :class:`UnknownAccount` if the account is missing.

    Inserted *before* the account row is touched (see :func:`hold`), and only
    if the account exists, so an unknown id is an answer rather than a
    foreign-key violation. It holds nothing until :func:`hold` succeeds in
    the same transaction; a refused hold rolls the row back.
    """
    rows = tx.execute(
        f"INSERT INTO ledger_reservations ({RESERVATION_COLUMNS})"
        " SELECT ?, ?, ?, ?, ?, ?, ?, ?"
        " WHERE EXISTS (SELECT 1 FROM ledger_accounts WHERE account_id = ?)",
        (
            reservation.id,
            reservation.account_id,
            reservation.amount,
            reservation.model_id,
            reservation.streaming_session_id,
            "open",
            reservation.created_at,
            reservation.holder,
            reservation.account_id,
        ),
    )
    if rows.rowcount != 1:
        raise UnknownAccount(reservation.account_id)


def hold(tx: Tx, account_id: str, credits: int) -> None:
    """Add ``credits`` to the account's ``reserved``, or :class:`InsufficientCredits`.

    One conditional statement does the check and the write
    (``… WHERE balance - reserved >= ?``). On PostgreSQL it waits for the
    row lock of a concurrent writer and re-evaluates the condition against
    the row that writer committed (READ COMMITTED), so two holds can never
    both pass on the same credits. When it matches nothing, the account is
    read again under the row lock and the decision is made on that locked
    row: a refusal reports an ``available`` that is true while refusing.
    """
    # Invariant: reserved == sum(open reservations), so available >= 0.
    rows = tx.execute(
        "UPDATE ledger_accounts SET reserved = reserved + ?"
        " WHERE account_id = ? AND balance - reserved >= ?",
        (credits, account_id, credits),
    )
    if rows.rowcount == 1:
        return
    current = read_balance(tx, account_id, lock=True)
    if current.available < credits:
        raise InsufficientCredits(credits, current.available)
    # Credits came free between the two statements (PostgreSQL only: a
    # release committed); the row is locked now, so this cannot overdraw.
    tx.execute(
        "UPDATE ledger_accounts SET reserved = reserved + ? WHERE account_id = ?",
        (credits, account_id),
    )


class Closed(NamedTuple):
    """A reservation as :func:`close_reservation` closed it."""

    id: str
    account_id: str
    amount: int
    model_id: str | None
    streaming_session_id: str | None
    charged: int


def close_reservation(
    tx: Tx, reservation_id: str, status: ReservationStatus, charge: int
) -> Closed:
    """Close an open reservation as ``status``, charging ``min(charge, amount)``.

    Exactly once: one conditional ``UPDATE … WHERE status = 'open'`` decides.
    Two closers racing on PostgreSQL serialise on the reservation's row lock;
    the second re-evaluates ``status = 'open'`` against the first's committed
    row, matches nothing and gets :class:`ReservationClosed` (or
    :class:`UnknownReservation` for an id that never existed). The caller
    returns the hold with :func:`return_hold` in the same transaction.
    """
    # Any amount is <= MAX_CREDITS, so capping here changes nothing but the
    # width of the integer sent (an 8-byte column cannot take 10**30).
    charge = min(charge, MAX_CREDITS)
    row = first(
        tx.execute(
            "UPDATE ledger_reservations SET status = ?, closed_at = ?,"
            " charged = CASE WHEN amount < ? THEN amount ELSE ? END"
            " WHERE id = ? AND status = 'open'"
            " RETURNING id, account_id, amount, model_id, streaming_session_id, charged",
            (status, now_iso(), charge, charge, reservation_id),
        )
    )
    if row is None:
        found = first(
            tx.execute("SELECT status FROM ledger_reservations WHERE id = ?", (reservation_id,))
        )
        if found is None:
            raise UnknownReservation(reservation_id)
        raise ReservationClosed(reservation_id, found[0])
    return Closed(row[0], row[1], int(row[2]), row[3], row[4], int(row[5]))


def return_hold(tx: Tx, closed: Closed) -> None:
    """Give a closed reservation's hold back to its account, minus what it charged."""
    # Invariant: reserved == sum(open reservations); balance == sum(entries.amount)
    # (the caller writes the charge entry of -closed.charged in this transaction).
    tx.execute(
        "UPDATE ledger_accounts SET reserved = reserved - ?, balance = balance - ?"
        " WHERE account_id = ?",
        (closed.amount, closed.charged, closed.account_id),
    )


def settlement_work(
    reservation_id: str,
    charge: int,
    model_id: str | None,
    streaming_session_id: str | None,
    input_tokens: int,
    output_tokens: int,
) -> Callable[[Tx], Settlement]:
    """The statements of a settlement (``SqlLedger.settle``, ``SqlLedger.settlement``),
    its arguments checked first: the reservation closes, the charge entry, the rest
    returned."""
    if isinstance(charge, bool) or not isinstance(charge, int) or charge < 0:
        raise InvalidAmount(f"charge must be a non-negative integer, got {charge!r}")
    require_count("input_tokens", input_tokens)
    require_count("output_tokens", output_tokens)

    def work(tx: Tx) -> Settlement:
        closed = close_reservation(tx, reservation_id, "settled", charge)
        entry = None
        if closed.charged:
            entry = insert_entry(
                tx,
                closed.account_id,
                "charge",
                -closed.charged,
                model_id=model_id if model_id is not None else closed.model_id,
                streaming_session_id=(
                    streaming_session_id
                    if streaming_session_id is not None
                    else closed.streaming_session_id
                ),
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                reservation_id=closed.id,
            )
        return_hold(tx, closed)
        return Settlement(closed.id, closed.charged, closed.amount - closed.charged, entry)

    return work


def reservation_work(
    account_id: str,
    credits: int,
    model_id: str | None,
    streaming_session_id: str | None,
    holder: str | None,
) -> Callable[[Tx], Reservation]:
    """The statements of a reservation, for ``SqlLedger.reserve`` and
    ``SqlLedger.reservation``: the row, then the hold (see :func:`hold`)."""

    def work(tx: Tx) -> Reservation:
        reservation = Reservation.new(account_id, credits, model_id, streaming_session_id, holder)
        insert_reservation(tx, reservation)
        hold(tx, account_id, credits)
        return reservation

    return work
