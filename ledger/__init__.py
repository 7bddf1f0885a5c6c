"""chinwag's credits ledger: accounts, reservations and entries, in SQLite or PostgreSQL.

No HTTP here, and no import of ``server`` or ``observation``: the server
imports this package, never the other way round. Import only what this
module re-exports::

    from ledger import LedgerBackend, open_ledger, Price, InsufficientCredits

    book = open_ledger("chinwag.db")                      # SQLite (ledger.Ledger)
    book = open_ledger("postgresql://u:pw@db/chinwag")    # PostgreSQL (PostgresLedger)

Both backends implement :class:`LedgerBackend`, one API with one promise
(:mod:`ledger.core`), under any interleaving of threads, connections and
processes: no overdraft, nothing lost, ``balance == sum(entries)``,
exactly-once settle, idempotent allocation. A stream reserves its worst case
(:meth:`Price.worst_case`), settles to what it used (``settle``) or releases
(``release``). Every call is synchronous: the SQLite one may run on the Trio
thread; the PostgreSQL one does network I/O and must be called through
``trio.to_thread.run_sync`` (see :mod:`ledger.postgres`). Invariants
(``verify()``)::

    balance == sum(entries.amount)
    reserved == sum(open reservations)
    available == balance - reserved >= 0

Errors, each with a stable ``code`` for the HTTP layer::

    LedgerError                 INTERNAL_ERROR (a database constraint refused a write)
    ├── InsufficientCredits     INSUFFICIENT_CREDITS  (.needed, .available)
    ├── UnknownAccount          ACCOUNT_NOT_FOUND     (.account_id)
    ├── UnknownReservation      RESERVATION_NOT_FOUND (.reservation_id)
    ├── IdempotencyConflict     IDEMPOTENCY_CONFLICT  (.key)
    ├── ReservationClosed       RESERVATION_CLOSED    (.reservation_id, .status)
    ├── InvalidAmount           VALIDATION_ERROR      (.message)
    ├── LedgerUnavailable       SERVICE_UNAVAILABLE   (.message; PostgreSQL: retry later)
    └── SchemaTooNew            SCHEMA_TOO_NEW        (.found, .supported; at open)

``PostgresLedger`` and ``PostgresPool`` (the connection policy the server's
PostgreSQL store shares) are imported on first use, so the SQLite default
never loads psycopg.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .backend import LedgerBackend as LedgerBackend
from .backend import open_ledger as open_ledger
from .errors import IdempotencyConflict as IdempotencyConflict
from .errors import InsufficientCredits as InsufficientCredits
from .errors import InvalidAmount as InvalidAmount
from .errors import LedgerError as LedgerError
from .errors import LedgerUnavailable as LedgerUnavailable
from .errors import ReservationClosed as ReservationClosed
from .errors import SchemaTooNew as SchemaTooNew
from .errors import UnknownAccount as UnknownAccount
from .errors import UnknownReservation as UnknownReservation
from .pricing import Price as Price
from .schema import SCHEMA_VERSION as SCHEMA_VERSION
from .sqlite import SqliteLedger as SqliteLedger
from .urls import InvalidDatabaseUrl as InvalidDatabaseUrl
from .urls import is_postgres_url as is_postgres_url
from .urls import mask_url as mask_url
from .validation import MAX_CREDITS as MAX_CREDITS
from .values import Balance as Balance
from .values import Entry as Entry
from .values import EntryKind as EntryKind
from .values import LedgerStatistics as LedgerStatistics
from .values import Reservation as Reservation
from .values import ReservationStatus as ReservationStatus
from .values import Settlement as Settlement

#: The SQLite ledger under its historic name (``ledger.Ledger(path)``, ``Ledger.memory()``).
Ledger = SqliteLedger

if TYPE_CHECKING:
    from .pgpool import PostgresPool as PostgresPool
    from .postgres import PostgresLedger as PostgresLedger


def __getattr__(name: str) -> object:
    # Lazy: psycopg is imported only by a process that uses PostgreSQL.
    if name == "PostgresLedger":
        from .postgres import PostgresLedger

        return PostgresLedger
    if name == "PostgresPool":
        from .pgpool import PostgresPool

        return PostgresPool
    raise AttributeError(f"module 'ledger' has no attribute {name!r}")
