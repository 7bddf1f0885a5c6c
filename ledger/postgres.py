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
* **The hot path in one round trip.** ``reserve`` and ``settle`` first try
  one autocommit statement (data-modifying CTEs: the same conditional
  writes, in the same order); when it matches nothing (refused, unknown,
  already closed) the shared transactional version runs and decides, under
  the same locks. Every other method is the shared one (:mod:`ledger.core`).

Calling it from Trio: every method blocks its thread for 1 to 6 network round
trips, each write ending in a durable commit (~0.2 to 1 ms on loopback; see
``scripts/bench_storage.py``). Call it
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
from .errors import InvalidAmount, LedgerError, LedgerUnavailable
from .pgpool import Connection, PostgresPool
from .postgres_schema import migrate
from .tx import Tx
from .validation import MAX_CREDITS, require_count, require_credits
from .values import Entry, Reservation, Settlement, now_iso

__all__ = ["PostgresLedger"]

T = TypeVar("T")

_SNAPSHOT = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"

# The hot path in one statement each (one round trip, autocommit): the same
# writes as the shared transactional versions in ledger.core, as data-modifying
# CTEs. An UPDATE in a CTE waits for a concurrent writer's row lock and then
# re-evaluates its WHERE and SET on the row that writer committed (READ
# COMMITTED), exactly as the lone statements do. No row back means "not
# here": the shared version then runs, under locks, and raises the right
# error (or succeeds, if credits came free in between).
_RESERVE = """
WITH held AS (
    UPDATE ledger_accounts SET reserved = reserved + %(amount)s
     WHERE account_id = %(account)s AND balance - reserved >= %(amount)s
    RETURNING account_id)
INSERT INTO ledger_reservations
       (id, account_id, amount, model_id, streaming_session_id, status, created_at, holder)
SELECT %(id)s, account_id, %(amount)s, %(model)s, %(stream)s, 'open', %(now)s, %(holder)s
  FROM held
RETURNING id
"""
_SETTLE = """
WITH closed AS (
    UPDATE ledger_reservations
       SET status = 'settled', closed_at = %(now)s,
           charged = CASE WHEN amount < %(charge)s THEN amount ELSE %(charge)s END
     WHERE id = %(id)s AND status = 'open'
    RETURNING id, account_id, amount, charged,
              COALESCE(%(model)s::text, model_id) AS model_id,
              COALESCE(%(stream)s::text, streaming_session_id) AS streaming_session_id),
charge AS (
    INSERT INTO ledger_entries (account_id, kind, amount, model_id, streaming_session_id,
                                input_tokens, output_tokens, reservation_id, created_at)
    SELECT account_id, 'charge', -charged, model_id, streaming_session_id,
           %(input)s, %(output)s, id, %(now)s
      FROM closed WHERE charged > 0
    RETURNING id),
returned AS (
    -- Invariant: reserved == sum(open reservations); balance == sum(entries.amount).
    UPDATE ledger_accounts a SET reserved = a.reserved - c.amount, balance = a.balance - c.charged
      FROM closed c WHERE a.account_id = c.account_id)
SELECT c.id, c.account_id, c.amount, c.charged, c.model_id, c.streaming_session_id,
       (SELECT id FROM charge)
  FROM closed c
"""
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

    # -- the hot path: one statement each, else the shared version -------------------

    def reserve(
        self,
        account_id: str,
        credits: int,
        *,
        model_id: str | None = None,
        streaming_session_id: str | None = None,
        holder: str | None = None,
    ) -> Reservation:
        require_credits("credits", credits, allow_zero=True)
        reservation = Reservation.new(account_id, credits, model_id, streaming_session_id, holder)
        params = {
            "id": reservation.id,
            "account": account_id,
            "amount": credits,
            "model": model_id,
            "stream": streaming_session_id,
            "now": reservation.created_at,
            "holder": holder,
        }
        if self._one_statement(_RESERVE, params) is not None:
            return reservation
        return super().reserve(
            account_id,
            credits,
            model_id=model_id,
            streaming_session_id=streaming_session_id,
            holder=holder,
        )

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
        if isinstance(charge, bool) or not isinstance(charge, int) or charge < 0:
            raise InvalidAmount(f"charge must be a non-negative integer, got {charge!r}")
        require_count("input_tokens", input_tokens)
        require_count("output_tokens", output_tokens)
        now = now_iso()
        params = {
            "id": reservation_id,
            "charge": min(charge, MAX_CREDITS),
            "model": model_id,
            "stream": streaming_session_id,
            "input": input_tokens,
            "output": output_tokens,
            "now": now,
        }
        row = self._one_statement(_SETTLE, params)
        if row is None:  # not open (or unknown): the shared version says which
            return super().settle(
                reservation_id,
                charge,
                model_id=model_id,
                streaming_session_id=streaming_session_id,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
            )
        closed_id, account, amount, charged, model, stream, entry_id = row
        entry = None
        if entry_id is not None:
            entry = Entry(
                id=int(entry_id),
                account_id=account,
                kind="charge",
                amount=-int(charged),
                model_id=model,
                streaming_session_id=stream,
                reason=None,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                created_at=now,
                reservation_id=closed_id,
            )
        return Settlement(closed_id, int(charged), int(amount) - int(charged), entry)

    def _one_statement(self, sql: str, params: dict[str, object]) -> tuple[Any, ...] | None:
        """Run one writing statement in autocommit; its first row, or None."""

        def unit(conn: Connection) -> tuple[Any, ...] | None:
            with _map_integrity_errors():
                return conn.execute(sql, params).fetchone()

        return self._pool.run(unit, begin=None, idempotent=False)

    # -- transactions ----------------------------------------------------------------

    def _write(self, work: Callable[[Tx], T], *, durable: bool = True) -> T:
        def unit(conn: Connection) -> T:
            if not durable:  # the commit need not wait for the WAL flush (SqlLedger._write)
                conn.execute("SET LOCAL synchronous_commit TO OFF")
            with _map_integrity_errors():
                return work(_PgTx(conn))

        return self._pool.run(unit, begin="BEGIN", idempotent=False)

    def _within(self, conn: Connection, work: Callable[[Tx], T]) -> T:
        with _map_integrity_errors():
            return work(_PgTx(conn))

    def _read(self, work: Callable[[Tx], T], *, snapshot: bool = False) -> T:
        return self._pool.run(
            lambda conn: work(_PgTx(conn)),
            begin=_SNAPSHOT if snapshot else None,
            idempotent=True,
        )


def _migrate(conn: Connection) -> None:
    migrate(conn)
