"""Proving the ledger's invariants from its raw rows, and counting what it holds.

The accounts table caches ``balance`` and ``reserved`` for fast reads; these
queries recompute both from ``ledger_entries`` and ``ledger_reservations`` and
report every disagreement. Callers run them inside one read transaction (a
snapshot: ``BEGIN`` on SQLite, ``REPEATABLE READ READ ONLY`` on PostgreSQL),
so the whole report describes a single committed state. The SQL is shared by
both backends (see :mod:`ledger.tx`); sums are converted with ``int()``
because PostgreSQL's ``SUM(bigint)`` is a ``numeric``.
"""

from __future__ import annotations

from .tx import Tx
from .values import LedgerStatistics

__all__ = ["collect_statistics", "find_problems"]


def find_problems(conn: Tx) -> list[str]:
    """Every broken invariant as a human-readable line; ``[]`` when all hold."""
    problems: list[str] = []
    # Invariant: balance == sum(entries.amount); reserved == sum(open reservations).
    rows = conn.execute(
        """
        SELECT a.account_id, a.balance, a.reserved,
               (SELECT COALESCE(SUM(e.amount), 0) FROM ledger_entries e
                 WHERE e.account_id = a.account_id),
               (SELECT COALESCE(SUM(r.amount), 0) FROM ledger_reservations r
                 WHERE r.account_id = a.account_id AND r.status = 'open')
          FROM ledger_accounts a ORDER BY a.account_id
        """
    ).fetchall()
    for account_id, balance, reserved, entries_total, open_total in rows:
        entries_sum, open_sum = int(entries_total), int(open_total)
        if balance != entries_sum:
            problems.append(
                f"account {account_id!r}: balance {balance} != sum of entries {entries_sum}"
            )
        if reserved != open_sum:
            problems.append(
                f"account {account_id!r}: reserved {reserved} != sum of open reservations"
                f" {open_sum}"
            )
        # Invariant: available = balance - reserved >= 0 (cached and recomputed).
        if balance - reserved < 0:
            problems.append(f"account {account_id!r}: available {balance - reserved} < 0")
        if entries_sum - open_sum < 0:
            problems.append(
                f"account {account_id!r}: recomputed available {entries_sum - open_sum} < 0"
            )
    for reservation_id, status in conn.execute(
        """
        SELECT r.id, r.status FROM ledger_reservations r
          JOIN ledger_entries e ON e.reservation_id = r.id
         WHERE r.status <> 'settled'
        """
    ).fetchall():
        problems.append(f"reservation {reservation_id!r} is {status} but has a charge entry")
    # Invariant: a settled reservation's charge entry is exactly -charged.
    for reservation_id, charged, entry_amount in conn.execute(
        """
        SELECT r.id, r.charged, e.amount FROM ledger_reservations r
          LEFT JOIN ledger_entries e ON e.reservation_id = r.id
         WHERE r.status = 'settled' AND COALESCE(-e.amount, 0) <> r.charged
        """
    ).fetchall():
        problems.append(
            f"reservation {reservation_id!r}: charged {charged} but its entry is {entry_amount}"
        )
    for reservation_id, amount, charged in conn.execute(
        "SELECT id, amount, charged FROM ledger_reservations WHERE charged > amount"
    ).fetchall():
        problems.append(
            f"reservation {reservation_id!r}: charged {charged} exceeds its amount {amount}"
        )
    for table in ("ledger_entries", "ledger_reservations"):
        (orphans,) = conn.execute(
            f"SELECT COUNT(*) FROM {table} t WHERE NOT EXISTS"
            " (SELECT 1 FROM ledger_accounts a WHERE a.account_id = t.account_id)"
        ).fetchone()
        if orphans:
            problems.append(f"{table}: {orphans} row(s) reference no account")
    return problems


def collect_statistics(conn: Tx) -> LedgerStatistics:
    """Counts and credit totals across every account."""
    (accounts,) = conn.execute("SELECT COUNT(*) FROM ledger_accounts").fetchone()
    entries, allocations, charges, refunds = conn.execute(
        """
        SELECT COUNT(*),
               COALESCE(SUM(CASE WHEN kind = 'allocation' THEN amount END), 0),
               COALESCE(-SUM(CASE WHEN kind = 'charge' THEN amount END), 0),
               COALESCE(SUM(CASE WHEN kind = 'refund' THEN amount END), 0)
          FROM ledger_entries
        """
    ).fetchone()
    open_count, reserved, settled, released = conn.execute(
        """
        SELECT COALESCE(SUM(CASE WHEN status = 'open' THEN 1 ELSE 0 END), 0),
               COALESCE(SUM(CASE WHEN status = 'open' THEN amount END), 0),
               COALESCE(SUM(CASE WHEN status = 'settled' THEN 1 ELSE 0 END), 0),
               COALESCE(SUM(CASE WHEN status = 'released' THEN 1 ELSE 0 END), 0)
          FROM ledger_reservations
        """
    ).fetchone()
    return LedgerStatistics(
        accounts=int(accounts),
        entries=int(entries),
        open_reservations=int(open_count),
        reserved_credits=int(reserved),
        allocations_total=int(allocations),
        charges_total=int(charges),
        settled_total=int(settled),
        released_total=int(released),
        refunds_total=int(refunds),
    )
