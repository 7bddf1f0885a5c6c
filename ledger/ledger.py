"""The :class:`Ledger`: accounts, reservations and entries in one SQLite file.

Guarantees, for every method:

* **Synchronous and short.** Each call is one transaction of a few
  sub-millisecond statements; nothing awaits, so a Trio caller can call it
  on the Trio thread and it is atomic with respect to cancellation. It blocks
  only while another connection holds SQLite's write lock (at most
  ``busy_timeout`` = 5 s, then ``sqlite3.OperationalError``).
* **One writer.** Every method that moves credits runs inside one
  ``BEGIN IMMEDIATE … COMMIT``: the write lock is taken *before* the balance
  is read, so two connections (threads, processes) racing for the same
  credits are serialised and cannot both pass the balance check. Any
  exception rolls the whole transaction back: a rejected call changes nothing.
* **Exactly once.** A reservation closes (settle or release) once; an
  idempotency key allocates once per account.

Invariants, checked by :meth:`Ledger.verify`, for every account::

    balance   == sum(entries.amount)
    reserved  == sum(amount of open reservations)
    available == balance - reserved >= 0
"""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Self

from .audit import collect_statistics, find_problems
from .errors import (
    IdempotencyConflict,
    InsufficientCredits,
    InvalidAmount,
    UnknownAccount,
    map_integrity_errors,
)
from .schema import connect
from .statements import (
    close_reservation,
    credit,
    insert_entry,
    load_open_reservation,
    read_balance,
)
from .validation import require_count, require_credits, require_id
from .values import (
    ENTRY_COLUMNS,
    RESERVATION_COLUMNS,
    Balance,
    Entry,
    LedgerStatistics,
    Reservation,
    Settlement,
    entry_from_row,
    now_iso,
    reservation_from_row,
)

__all__ = ["Ledger"]


class Ledger:
    """The credits ledger over one SQLite file (``":memory:"`` for tests).

    Owns one connection, opened here and closed by :meth:`close` (or by
    leaving a ``with`` block). Calls from several threads on one ``Ledger``
    are serialised by an internal lock; several ``Ledger`` objects (or
    processes) on the same file are serialised by SQLite's write lock.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._conn = connect(path)
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def memory(cls) -> Self:
        """A private in-memory ledger (gone when closed)."""
        return cls(":memory:")

    def close(self) -> None:
        """Close the connection. Idempotent. Open reservations stay open (see :meth:`recover`)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- transactions --------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._conn
            # BEGIN IMMEDIATE: take the write lock before reading the balance.
            conn.execute("BEGIN IMMEDIATE")
            try:
                with map_integrity_errors():
                    yield conn
                    conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        # A deferred transaction: every SELECT inside sees one committed snapshot.
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # -- accounts ------------------------------------------------------------

    def open_account(self, account_id: str) -> Balance:
        """Create the account with balance 0 if missing; return its balance. Idempotent."""
        require_id("account_id", account_id)
        # Fast path, no write lock: the server calls this before every stream.
        with self._read() as conn:
            try:
                return read_balance(conn, account_id)
            except UnknownAccount:
                pass
        with self._write() as conn:
            conn.execute(
                "INSERT INTO ledger_accounts (account_id, created_at) VALUES (?, ?)"
                " ON CONFLICT (account_id) DO NOTHING",
                (account_id, now_iso()),
            )
            return read_balance(conn, account_id)

    def has_account(self, account_id: str) -> bool:
        with self._read() as conn:
            row = conn.execute(
                "SELECT 1 FROM ledger_accounts WHERE account_id = ?", (account_id,)
            ).fetchone()
            return row is not None

    def balance(self, account_id: str) -> Balance:
        """The account's balance, reserved and available credits, or :class:`UnknownAccount`."""
        with self._read() as conn:
            return read_balance(conn, account_id)

    def check(self, account_id: str, required: int) -> tuple[bool, int]:
        """``(available >= required, available)``. Reserves nothing: a later
        :meth:`reserve` may still fail. Use the reservation itself as the check."""
        require_count("required", required)
        with self._read() as conn:
            available = read_balance(conn, account_id).available
        return available >= required, available

    # -- money in ------------------------------------------------------------

    def allocate(
        self,
        account_id: str,
        credits: int,
        *,
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> Balance:
        """Add ``credits`` (an int in ``(0, 2**53]``) as an ``allocation`` entry.

        With ``idempotency_key``: the first call with that key on this account
        allocates; a later call with the same amount allocates nothing and
        returns the current balance; one with another amount raises
        :class:`IdempotencyConflict`. Raises :class:`UnknownAccount` if the
        account was never opened, :class:`InvalidAmount` if the balance would
        pass 2**53.
        """
        require_credits("credits", credits)
        with self._write() as conn:
            current = read_balance(conn, account_id)
            if idempotency_key is not None:
                row = conn.execute(
                    "SELECT amount FROM ledger_entries"
                    " WHERE account_id = ? AND idempotency_key = ?",
                    (account_id, idempotency_key),
                ).fetchone()
                if row is not None:
                    if row[0] != credits:
                        raise IdempotencyConflict(idempotency_key)
                    return current
            credit(conn, current, credits)
            insert_entry(
                conn,
                account_id,
                "allocation",
                credits,
                reason=reason,
                idempotency_key=idempotency_key,
            )
            return read_balance(conn, account_id)

    def refund(
        self,
        account_id: str,
        credits: int,
        *,
        reason: str | None = None,
        streaming_session_id: str | None = None,
    ) -> Entry:
        """Give ``credits`` (an int in ``(0, 2**53]``) back as a ``refund`` entry."""
        require_credits("credits", credits)
        with self._write() as conn:
            credit(conn, read_balance(conn, account_id), credits)
            return insert_entry(
                conn,
                account_id,
                "refund",
                credits,
                reason=reason,
                streaming_session_id=streaming_session_id,
            )

    # -- reservations --------------------------------------------------------

    def reserve(
        self,
        account_id: str,
        credits: int,
        *,
        model_id: str | None = None,
        streaming_session_id: str | None = None,
        holder: str | None = None,
    ) -> Reservation:
        """Hold ``credits`` (an int in ``[0, 2**53]``; 0 for a free model) for one call.

        Raises :class:`InsufficientCredits` when ``available < credits``;
        otherwise ``available`` drops by ``credits`` until the reservation is
        settled or released. ``holder`` names the reserving process for
        :meth:`recover`.
        """
        require_credits("credits", credits, allow_zero=True)
        with self._write() as conn:
            current = read_balance(conn, account_id)
            if current.available < credits:
                raise InsufficientCredits(credits, current.available)
            reservation = Reservation(
                id=f"res_{uuid.uuid4().hex}",
                account_id=account_id,
                amount=credits,
                model_id=model_id,
                streaming_session_id=streaming_session_id,
                status="open",
                created_at=now_iso(),
                holder=holder,
            )
            conn.execute(
                f"INSERT INTO ledger_reservations ({RESERVATION_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    reservation.id,
                    account_id,
                    credits,
                    model_id,
                    streaming_session_id,
                    "open",
                    reservation.created_at,
                    holder,
                ),
            )
            # Invariant: reserved == sum(open reservations), so available >= 0.
            conn.execute(
                "UPDATE ledger_accounts SET reserved = reserved + ? WHERE account_id = ?",
                (credits, account_id),
            )
            return reservation

    def settle(
        self,
        reservation_id: str,
        charge: int,
        *,
        model_id: str | None = None,
        streaming_session_id: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> Settlement:
        """Close the reservation as ``settled``: charge ``charge``, release the rest.

        One transaction: the reservation closes, a ``charge`` entry of
        ``-charged`` is written (none when 0) and the remainder returns to
        ``available``. A ``charge`` above the reservation is capped at it: the
        reservation was the call's worst case, and charging more could drive
        ``available`` below zero, credits the caller never held. ``model_id``
        and ``streaming_session_id`` default to the reservation's.
        Raises :class:`ReservationClosed` if already settled or released
        (exactly once), :class:`UnknownReservation`, or :class:`InvalidAmount`
        for a negative or non-integer ``charge`` or token count.
        """
        if isinstance(charge, bool) or not isinstance(charge, int) or charge < 0:
            raise InvalidAmount(f"charge must be a non-negative integer, got {charge!r}")
        require_count("input_tokens", input_tokens)
        require_count("output_tokens", output_tokens)
        with self._write() as conn:
            reservation = load_open_reservation(conn, reservation_id)
            charged = min(charge, reservation.amount)
            released = reservation.amount - charged
            close_reservation(conn, reservation, "settled", charged)
            entry = None
            if charged:
                entry = insert_entry(
                    conn,
                    reservation.account_id,
                    "charge",
                    -charged,
                    model_id=model_id if model_id is not None else reservation.model_id,
                    streaming_session_id=(
                        streaming_session_id
                        if streaming_session_id is not None
                        else reservation.streaming_session_id
                    ),
                    input_tokens=input_tokens,
                    output_tokens=output_tokens,
                    reservation_id=reservation.id,
                )
            return Settlement(reservation.id, charged, released, entry)

    def release(self, reservation_id: str) -> None:
        """Close the reservation as ``released``: nothing charged, all returned.

        Raises :class:`ReservationClosed` if already closed (exactly once).
        """
        with self._write() as conn:
            close_reservation(conn, load_open_reservation(conn, reservation_id), "released", 0)

    def open_reservations(self, account_id: str | None = None) -> list[Reservation]:
        """Open reservations, oldest first (one account's, or everyone's)."""
        sql = f"SELECT {RESERVATION_COLUMNS} FROM ledger_reservations WHERE status = 'open'"
        params: tuple[str, ...] = ()
        if account_id is not None:
            sql += " AND account_id = ?"
            params = (account_id,)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY created_at, rowid", params).fetchall()
        return [reservation_from_row(row) for row in rows]

    def recover(self, holder: str | None = None) -> int:
        """Release reservations a dead process left open; return how many.

        ``holder=None`` releases every open reservation; otherwise every one
        whose holder is not ``holder`` (the caller's own, live, id), including
        those made with no holder. Call it at start-up, before serving: nothing
        is charged (a stream cut by a crash is never charged twice, nor at all)
        and nothing stays reserved. Only safe while no *other* live process
        holds reservations in this file: theirs would be released too, and
        their later settle would raise :class:`ReservationClosed`.
        """
        sql = f"SELECT {RESERVATION_COLUMNS} FROM ledger_reservations WHERE status = 'open'"
        params: tuple[str, ...] = ()
        if holder is not None:
            sql += " AND holder IS NOT ?"
            params = (holder,)
        with self._write() as conn:
            stale = [reservation_from_row(row) for row in conn.execute(sql, params)]
            for reservation in stale:
                close_reservation(conn, reservation, "released", 0)
            return len(stale)

    # -- history -------------------------------------------------------------

    def entries(
        self, account_id: str, *, offset: int = 0, limit: int = 20
    ) -> tuple[list[Entry], int]:
        """One page of the account's entries, newest first, and the total count."""
        require_count("offset", offset)
        require_count("limit", limit)
        with self._read() as conn:
            read_balance(conn, account_id)  # UnknownAccount for an unknown id
            rows = conn.execute(
                f"SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE account_id = ?"
                " ORDER BY id DESC LIMIT ? OFFSET ?",
                (account_id, limit, offset),
            ).fetchall()
            (total,) = conn.execute(
                "SELECT COUNT(*) FROM ledger_entries WHERE account_id = ?", (account_id,)
            ).fetchone()
        return [entry_from_row(row) for row in rows], total

    def usage_by_model(self, account_id: str) -> dict[str, int]:
        """Credits charged to the account per model (positive); ``""`` for no model."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT COALESCE(model_id, ''), -SUM(amount) FROM ledger_entries"
                " WHERE account_id = ? AND kind = 'charge' GROUP BY 1 ORDER BY 1",
                (account_id,),
            ).fetchall()
        return {model: total for model, total in rows}

    def charges_for_stream(self, streaming_session_id: str) -> int:
        """Credits charged for one stream (positive; 0 when none)."""
        with self._read() as conn:
            (total,) = conn.execute(
                "SELECT COALESCE(-SUM(amount), 0) FROM ledger_entries"
                " WHERE streaming_session_id = ? AND kind = 'charge'",
                (streaming_session_id,),
            ).fetchone()
        return int(total)

    # -- audit ---------------------------------------------------------------

    def verify(self) -> list[str]:
        """Recompute every account from its entries and reservations; list each problem.

        ``[]`` means every invariant holds in one committed snapshot.
        """
        with self._read() as conn:
            return find_problems(conn)

    def statistics(self) -> LedgerStatistics:
        """A consistent snapshot of counts and credit totals."""
        with self._read() as conn:
            return collect_statistics(conn)
