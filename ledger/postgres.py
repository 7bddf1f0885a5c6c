"""The ledger in PostgreSQL: :class:`PostgresLedger`, the same API and promise as SQLite's.

How the promise of :mod:`ledger.core` holds here, under any interleaving of
connections and processes:

* **Isolation: READ COMMITTED, with row locks.** Every money-moving call is
  one ``BEGIN … COMMIT`` on one pooled connection. The account row is the
  lock: a reservation is the conditional
  ``UPDATE ledger_accounts SET reserved = reserved + $1 WHERE account_id = $2
  AND balance - reserved >= $1``, which waits for a concurrent writer's row
  lock and then re-evaluates its condition on the row that writer committed;
  allocations and refunds read the account ``FOR NO KEY UPDATE`` (the lock
  an ``UPDATE`` takes) before deciding. Never ``FOR UPDATE``: it conflicts
  with the ``KEY SHARE`` lock of a concurrent foreign-key check (a
  reservation being inserted for that account) and deadlocks with it.
  So no two transactions can both spend the same credits (no overdraft), and
  an idempotency key is looked up only while its account is locked (the
  UNIQUE index ``(account_id, idempotency_key)`` is the second line).
* **Exactly-once close.** Settle and release are one conditional
  ``UPDATE ledger_reservations … WHERE id = $1 AND status = 'open'``: a
  second closer waits on the reservation's row lock and then matches
  nothing. Locks are always taken reservation first, then account (recover
  locks all its reservations, in id order, before any account), so settles
  and recoveries cannot deadlock; a deadlock or serialisation victim would
  be rolled back whole and retried once.
* **Nothing half-written.** The CHECK constraints repeat the rules
  (``balance - reserved >= 0``, one charge per reservation); a connection
  lost mid-transaction aborts it server-side, and the caller gets
  :class:`~ledger.LedgerUnavailable` (see :mod:`ledger.pgpool` for the one
  ambiguous case, a loss during ``COMMIT``, which is still atomic).
* **Consistent reads.** ``verify()``, ``statistics()`` and ``entries()``
  run in one ``REPEATABLE READ READ ONLY`` transaction (one snapshot);
  one-statement reads run in autocommit.

Calling it from Trio: every method blocks its thread for 1 to 6 network round
trips (~0.3 to 1 ms on loopback; see ``scripts/bench_storage.py``). Call it
through ``trio.to_thread.run_sync(fn, limiter=limiter)`` with one
``CapacityLimiter`` of at most ``max_connections`` for the ledger, never on
the Trio thread. A thread cannot be cancelled: an abandoned call still
commits or rolls back as a whole, so cancellation never splits a
transaction. Errors: the same family as SQLite's, plus
:class:`~ledger.LedgerUnavailable` (database unreachable, connection lost,
pool exhausted after ``pool_timeout``, a row lock not granted within
``lock_timeout``); constraint violations become
:class:`~ledger.LedgerError` (``INTERNAL_ERROR``), as on SQLite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg

from .core import SqlLedger
from .errors import LedgerError, LedgerUnavailable
from .pgpool import Connection, PostgresPool
from .postgres_schema import migrate
from .tx import Tx

__all__ = ["PostgresLedger"]

T = TypeVar("T")

_SNAPSHOT = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"
_converted: dict[str, str] = {}


def _to_pyformat(sql: str) -> str:
    """The shared SQL's ``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled)."""
    converted = _converted.get(sql)
    if converted is None:
        converted = _converted[sql] = sql.replace("%", "%%").replace("?", "%s")
    return converted


class _PgTx:
    """:class:`~ledger.tx.Tx` over a psycopg connection inside one of our transactions."""

    __slots__ = ("_conn",)
    # The row lock an UPDATE takes: serialises writers of the row, and is
    # compatible with the KEY SHARE lock of other transactions' FK checks.
    lock_rows = " FOR NO KEY UPDATE"

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[object] = (), /) -> psycopg.Cursor[Any]:
        # Always pass a tuple: psycopg then expands %s and un-doubles %%.
        return self._conn.execute(_to_pyformat(sql), tuple(params))


@contextmanager
def _map_integrity_errors() -> Iterator[None]:
    """A constraint that refused a write becomes :class:`LedgerError` (INTERNAL_ERROR)."""
    try:
        yield
    except psycopg.IntegrityError as exc:
        detail = exc.diag.constraint_name or type(exc).__name__
        raise LedgerError(f"ledger integrity constraint refused the write: {detail}") from exc


class PostgresLedger(SqlLedger):
    """The credits ledger in one PostgreSQL database (``postgresql://…``).

    Opening connects once (an unreachable database raises
    :class:`~ledger.LedgerUnavailable` naming the masked URL), creates or
    upgrades the ``ledger_*`` tables (a newer schema raises
    :class:`~ledger.SchemaTooNew`), then keeps a pool of at most
    ``max_connections`` connections. Thread-safe: any number of threads may
    call one ledger; at most ``max_connections`` run at once, the others wait
    up to ``pool_timeout`` seconds. ``url`` is the masked URL.
    """

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 10,
        pool_timeout: float = 2.0,
        connect_timeout: float = 5.0,
        lock_timeout: float = 5.0,
        application_name: str = "chinwag-ledger",
    ) -> None:
        self._pool = PostgresPool(
            url,
            what="the ledger database",
            unavailable=LedgerUnavailable,
            application_name=application_name,
            max_size=max_connections,
            timeout=pool_timeout,
            connect_timeout=connect_timeout,
            lock_timeout=lock_timeout,
        )
        self.url = self._pool.url
        try:
            self._pool.open(_migrate)
        except BaseException:
            self._pool.close()
            raise

    def close(self) -> None:
        """Close the pool's connections. Idempotent. Open reservations stay open."""
        self._pool.close()

    def _write(self, work: Callable[[Tx], T]) -> T:
        def unit(conn: Connection) -> T:
            with _map_integrity_errors():
                return work(_PgTx(conn))

        return self._pool.run(unit, begin="BEGIN", idempotent=False)

    def _read(self, work: Callable[[Tx], T], *, snapshot: bool = False) -> T:
        return self._pool.run(
            lambda conn: work(_PgTx(conn)),
            begin=_SNAPSHOT if snapshot else None,
            idempotent=True,
        )


def _migrate(conn: Connection) -> None:
    migrate(conn)
