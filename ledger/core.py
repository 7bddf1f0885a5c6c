"""The ledger's operations, written once over :class:`~ledger.tx.Tx`; backends add transactions.

:class:`SqlLedger` holds every public method of the ledger (those that only
tell what happened, from :class:`ledger.history.LedgerHistory`). A backend
(:class:`ledger.sqlite.SqliteLedger`, :class:`ledger.postgres.PostgresLedger`)
supplies only how a unit of work runs:

* :meth:`SqlLedger._write` runs ``work(tx)`` in one read-write transaction
  that serialises writers of the same account — ``BEGIN IMMEDIATE`` on
  SQLite (the file's one write lock, taken before anything is read), row
  locks under READ COMMITTED on PostgreSQL (the account row is locked by the
  first statement that writes it or reads it ``FOR NO KEY UPDATE``, and every later
  statement of the transaction sees the rows other writers committed first).
  It commits when ``work`` returns and rolls back when it raises: a rejected
  call changes nothing.
* :meth:`SqlLedger._read` runs ``work(tx)`` reading only; with
  ``snapshot=True`` every statement sees one committed state.

Guarantees, for every backend and every interleaving of callers (threads,
connections, processes):

* **No overdraft.** A reservation is one conditional statement
  (:func:`ledger.statements.hold`): it passes only if ``available >= credits``
  on the latest committed row, under that row's write lock.
* **Nothing lost.** Each operation is one transaction; the cached
  ``balance``/``reserved`` columns move in the same transaction as the entry
  or reservation that justifies them.
* **Exactly once.** A reservation closes (settle or release) once
  (:func:`ledger.statements.close_reservation`); an idempotency key allocates
  once per account (the account row is locked while the key is looked up,
  and a UNIQUE index backs it).

Invariants, checked by :meth:`SqlLedger.verify`, for every account::

    balance   == sum(entries.amount)
    reserved  == sum(amount of open reservations)
    available == balance - reserved >= 0
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, TypeVar

from .errors import IdempotencyConflict, UnknownAccount
from .history import LedgerHistory
from .statements import (
    close_reservation,
    credit,
    insert_entry,
    read_balance,
    reservation_work,
    return_hold,
    settlement_work,
)
from .tx import Tx, first
from .validation import require_count, require_credits, require_id
from .values import (
    Balance,
    Entry,
    Reservation,
    Settlement,
    now_iso,
)

__all__ = ["SqlLedger"]

T = TypeVar("T")


class SqlLedger(LedgerHistory):
    """Every ledger operation; subclasses decide how a transaction runs.

    Each method is synchronous and blocks for its transaction's round trips
    (SQLite: sub-millisecond local I/O; PostgreSQL: network). See the
    backend's docstring for where to call it from.
    """

    @abstractmethod
    def _write(self, work: Callable[[Tx], T], *, durable: bool = True) -> T:
        """Run ``work`` in one read-write transaction (see the module docstring).

        ``durable=False``: the commit may return before it reaches the disk, so
        a power cut (never a killed process) can lose it — whole, with its
        effect on the balance. Only for :meth:`reserve`: a reservation
        outlives its process only to be released by :meth:`recover` (or settled
        by a cluster survivor from what Redis saw), so losing one loses
        nothing; the next durable commit (its settlement) flushes it anyway.
        And for :meth:`open_account`'s new empty account, made again on its
        next use if a power cut took it.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the backend's connections. Idempotent. Open reservations stay open."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- accounts ------------------------------------------------------------

    def open_account(self, account_id: str) -> Balance:
        """Create the account with balance 0 if missing; return its balance. Idempotent."""
        require_id("account_id", account_id)
        # Fast path, no write lock: the server calls this before every stream.
        try:
            return self._read(lambda tx: read_balance(tx, account_id))
        except UnknownAccount:
            pass

        def work(tx: Tx) -> Balance:
            tx.execute(
                "INSERT INTO ledger_accounts (account_id, created_at) VALUES (?, ?)"
                " ON CONFLICT (account_id) DO NOTHING",
                (account_id, now_iso()),
            )
            return read_balance(tx, account_id)

        # Not durable: an empty account lost to a power cut is made again on
        # its first use, and it lets a stream's opening commit without an fsync.
        return self._write(work, durable=False)

    def has_account(self, account_id: str) -> bool:
        return self._read(
            lambda tx: (
                first(
                    tx.execute("SELECT 1 FROM ledger_accounts WHERE account_id = ?", (account_id,))
                )
                is not None
            )
        )

    def balance(self, account_id: str) -> Balance:
        """The account's balance, reserved and available credits, or :class:`UnknownAccount`."""
        return self._read(lambda tx: read_balance(tx, account_id))

    def check(self, account_id: str, required: int) -> tuple[bool, int]:
        """``(available >= required, available)``. Reserves nothing: a later
        :meth:`reserve` may still fail. Use the reservation itself as the check."""
        require_count("required", required)
        available = self._read(lambda tx: read_balance(tx, account_id)).available
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
        allocates; a later call with the same amount and reason allocates
        nothing and returns the current balance; one with another amount or
        reason raises :class:`IdempotencyConflict`. (Keys are per account: the
        same key on another account is another allocation.) Raises :class:`UnknownAccount` if the
        account was never opened, :class:`InvalidAmount` if the balance would
        pass 2**53.
        """
        require_credits("credits", credits)

        def work(tx: Tx) -> Balance:
            # Locked first: racing replays of one key serialise here, and the
            # second sees the first's committed entry below.
            current = read_balance(tx, account_id, lock=True)
            if idempotency_key is not None:
                row = first(
                    tx.execute(
                        "SELECT amount, reason FROM ledger_entries"
                        " WHERE account_id = ? AND idempotency_key = ?",
                        (account_id, idempotency_key),
                    )
                )
                if row is not None:
                    if (int(row[0]), row[1]) != (credits, reason):
                        raise IdempotencyConflict(idempotency_key)
                    return current
            after = credit(tx, current, credits)
            insert_entry(
                tx,
                account_id,
                "allocation",
                credits,
                reason=reason,
                idempotency_key=idempotency_key,
            )
            return after

        return self._write(work)

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

        def work(tx: Tx) -> Entry:
            credit(tx, read_balance(tx, account_id, lock=True), credits)
            return insert_entry(
                tx,
                account_id,
                "refund",
                credits,
                reason=reason,
                streaming_session_id=streaming_session_id,
            )

        return self._write(work)

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
        work = reservation_work(account_id, credits, model_id, streaming_session_id, holder)
        return self._write(work, durable=False)

    def reservation(
        self,
        account_id: str,
        credits: int,
        *,
        model_id: str | None = None,
        streaming_session_id: str | None = None,
        holder: str | None = None,
    ) -> Callable[[Any], Reservation]:
        """:meth:`reserve` as a unit of work for a transaction of the caller's.

        ``unit(conn)`` runs it on ``conn``, a connection of this ledger's kind
        to this ledger's database, inside a transaction the caller commits
        or rolls back: the server opens a stream's reservation and its two
        messages as one commit (``StoreBackend.open_turn``). Creates the
        account if it is missing, as :meth:`open_account` does. Raises as
        :meth:`reserve`; the caller's transaction then rolls back whole.
        """
        require_id("account_id", account_id)
        require_credits("credits", credits, allow_zero=True)
        reserve = reservation_work(account_id, credits, model_id, streaming_session_id, holder)

        def work(tx: Tx) -> Reservation:
            tx.execute(
                "INSERT INTO ledger_accounts (account_id, created_at) VALUES (?, ?)"
                " ON CONFLICT (account_id) DO NOTHING",
                (account_id, now_iso()),
            )
            return reserve(tx)

        return lambda conn: self._within(conn, work)

    @abstractmethod
    def _within(self, conn: Any, work: Callable[[Tx], T]) -> T:
        """Run ``work`` on ``conn`` inside the caller's transaction (:meth:`reservation`)."""

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
        work = settlement_work(
            reservation_id, charge, model_id, streaming_session_id, input_tokens, output_tokens
        )
        return self._write(work)

    def settlement(
        self,
        reservation_id: str,
        charge: int,
        *,
        model_id: str | None = None,
        streaming_session_id: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> Callable[[Any], Settlement]:
        """:meth:`settle` as a unit of work for a transaction of the caller's.

        As :meth:`reservation`: ``unit(conn)`` runs it on ``conn`` inside a
        transaction the caller commits or rolls back. The server ends a call
        with its message, its settlement and its telemetry row as one commit
        (``StoreBackend.close_turn``), so the stored message always says what
        the ledger charged (the capped amount). Validates and raises as
        :meth:`settle`; the caller's transaction then rolls back whole.
        """
        work = settlement_work(
            reservation_id, charge, model_id, streaming_session_id, input_tokens, output_tokens
        )
        return lambda conn: self._within(conn, work)

    def release(self, reservation_id: str) -> None:
        """Close the reservation as ``released``: nothing charged, all returned.

        Raises :class:`ReservationClosed` if already closed (exactly once).
        """
        self._write(
            lambda tx: return_hold(tx, close_reservation(tx, reservation_id, "released", 0))
        )

    def recover(self, holder: str | None = None) -> int:
        """Release reservations a dead process left open; return how many.

        ``holder=None`` releases every open reservation; otherwise every one
        whose holder is not ``holder`` (the caller's own, live, id), including
        those made with no holder. Call it at start-up, before serving: nothing
        is charged (a stream cut by a crash is never charged twice, nor at all)
        and nothing stays reserved. Only safe while no *other* live process
        holds reservations in this database: theirs would be released too, and
        their later settle would raise :class:`ReservationClosed`.
        """
        sql = "SELECT id FROM ledger_reservations WHERE status = 'open'"
        params: tuple[str, ...] = ()
        if holder is not None:
            sql += " AND (holder IS NULL OR holder <> ?)"
            params = (holder,)

        def work(tx: Tx) -> int:
            # Lock every stale reservation first, in id order, and only then
            # their accounts: the same order as settle (reservation, then
            # account), so a concurrent settle cannot deadlock with this.
            rows = tx.execute(sql + " ORDER BY id" + tx.lock_rows, params).fetchall()
            stale = [row[0] for row in rows]
            for reservation_id in stale:
                return_hold(tx, close_reservation(tx, reservation_id, "released", 0))
            return len(stale)

        return self._write(work)
