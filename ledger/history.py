"""What the ledger tells of what happened: an account's entries, its usage per
model, a stream's charges, the open reservations, and the audit of the
invariants (:mod:`ledger.audit`).

A base of :class:`ledger.core.SqlLedger` (kept apart from the operations that
move credits, so each module stays small): every method here only reads,
through the backend's ``_read``, and never takes a write lock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

from .audit import collect_statistics, find_problems
from .statements import read_balance
from .tx import Tx, first
from .validation import require_count
from .values import (
    ENTRY_COLUMNS,
    RESERVATION_COLUMNS,
    Entry,
    LedgerStatistics,
    Reservation,
    entry_from_row,
    reservation_from_row,
)

__all__ = ["LedgerHistory"]

T = TypeVar("T")


class LedgerHistory(ABC):
    """The ledger's read-only questions; subclasses decide how a read runs."""

    @abstractmethod
    def _read(self, work: Callable[[Tx], T], *, snapshot: bool = False) -> T:
        """Run ``work`` reading only; ``snapshot=True`` when it runs several statements."""

    def open_reservations(self, account_id: str | None = None) -> list[Reservation]:
        """Open reservations, oldest first (one account's, or everyone's)."""
        sql = f"SELECT {RESERVATION_COLUMNS} FROM ledger_reservations WHERE status = 'open'"
        params: tuple[str, ...] = ()
        if account_id is not None:
            sql += " AND account_id = ?"
            params = (account_id,)
        # rowid: insertion order (SQLite's implicit column; an identity column on PostgreSQL).
        rows = self._read(
            lambda tx: tx.execute(sql + " ORDER BY created_at, rowid", params).fetchall()
        )
        return [reservation_from_row(row) for row in rows]

    def entries(
        self, account_id: str, *, offset: int = 0, limit: int = 20
    ) -> tuple[list[Entry], int]:
        """One page of the account's entries, newest first, and the total count."""
        require_count("offset", offset)
        require_count("limit", limit)

        def work(tx: Tx) -> tuple[list[Entry], int]:
            read_balance(tx, account_id)  # UnknownAccount for an unknown id
            rows = tx.execute(
                f"SELECT {ENTRY_COLUMNS} FROM ledger_entries WHERE account_id = ?"
                " ORDER BY id DESC LIMIT ? OFFSET ?",
                (account_id, limit, offset),
            ).fetchall()
            (total,) = tx.execute(
                "SELECT COUNT(*) FROM ledger_entries WHERE account_id = ?", (account_id,)
            ).fetchone()
            return [entry_from_row(row) for row in rows], int(total)

        return self._read(work, snapshot=True)

    def usage_by_model(self, account_id: str) -> dict[str, int]:
        """Credits charged to the account per model (positive); ``""`` for no model."""
        rows = self._read(
            lambda tx: tx.execute(
                "SELECT COALESCE(model_id, ''), -SUM(amount) FROM ledger_entries"
                " WHERE account_id = ? AND kind = 'charge' GROUP BY 1 ORDER BY 1",
                (account_id,),
            ).fetchall()
        )
        return {model: int(total) for model, total in rows}

    def charges_for_stream(self, streaming_session_id: str) -> int:
        """Credits charged for one stream (positive; 0 when none)."""
        row = self._read(
            lambda tx: first(
                tx.execute(
                    "SELECT COALESCE(-SUM(amount), 0) FROM ledger_entries"
                    " WHERE streaming_session_id = ? AND kind = 'charge'",
                    (streaming_session_id,),
                )
            )
        )
        return int(row[0])

    # -- audit ---------------------------------------------------------------

    def verify(self) -> list[str]:
        """Recompute every account from its entries and reservations; list each problem.

        ``[]`` means every invariant holds in one committed snapshot.
        """
        return self._read(find_problems, snapshot=True)

    def statistics(self) -> LedgerStatistics:
        """A consistent snapshot of counts and credit totals."""
        return self._read(collect_statistics, snapshot=True)
