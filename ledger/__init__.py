"""chinwag's credits ledger: accounts, reservations and entries in SQLite.

No HTTP here, and no import of ``server`` or ``observation``: the server
imports this package, never the other way round. Import only what this
module re-exports::

    from ledger import Ledger, Price, InsufficientCredits

A stream reserves its worst case (:meth:`Price.worst_case`), settles to what
it used (:meth:`Ledger.settle`) or releases (:meth:`Ledger.release`); every
money-moving call is one ``BEGIN IMMEDIATE`` transaction, so concurrent
callers cannot double-spend. Invariants (:meth:`Ledger.verify`)::

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
    └── InvalidAmount           VALIDATION_ERROR      (.message)
"""

from .errors import IdempotencyConflict as IdempotencyConflict
from .errors import InsufficientCredits as InsufficientCredits
from .errors import InvalidAmount as InvalidAmount
from .errors import LedgerError as LedgerError
from .errors import ReservationClosed as ReservationClosed
from .errors import UnknownAccount as UnknownAccount
from .errors import UnknownReservation as UnknownReservation
from .ledger import Ledger as Ledger
from .pricing import Price as Price
from .schema import SCHEMA_VERSION as SCHEMA_VERSION
from .validation import MAX_CREDITS as MAX_CREDITS
from .values import Balance as Balance
from .values import Entry as Entry
from .values import EntryKind as EntryKind
from .values import LedgerStatistics as LedgerStatistics
from .values import Reservation as Reservation
from .values import ReservationStatus as ReservationStatus
from .values import Settlement as Settlement
